"""Tests for resnet/models.py: counts from the papers, variants, precision."""

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet import models

IMAGENET_PARAMS = {  # The reference implementation, 1000 classes.
    'resnet18': 11_689_512,
    'resnet34': 21_797_672,
    'resnet50': 25_557_032,
    'resnet101': 44_549_160,
    'resnet152': 60_192_808,
}
CIFAR_PARAMS_M = {  # Paper Table 6, millions, at the paper's precision.
    'resnet20': 0.27,
    'resnet32': 0.46,
    'resnet44': 0.66,
    'resnet56': 0.85,
    'resnet110': 1.7,
    'resnet1202': 19.4,
}
IMAGENET_GMACS = {  # Paper Table 1 "FLOPs" (multiply-adds), v1 placement.
    'resnet18': 1.8,
    'resnet34': 3.6,
    'resnet50': 3.8,
    'resnet101': 7.6,
    'resnet152': 11.3,
}


def num_classes_of(name):
  depth = int(name.removeprefix('plain').removeprefix('resnet'))
  return 1000 if depth in models.IMAGENET_DEPTHS else 10


def count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@functools.cache
def abstract(name, **overrides):
  """Shapes of the variables and logits of `name` on 2 images of 32x32."""
  model = models.create(name, num_classes=num_classes_of(name), **overrides)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  logits, variables = jax.eval_shape(
      functools.partial(model.init_with_output, train=False),
      jax.random.key(0), images)
  return variables, logits


# Compile fast: these tests check shapes and exact identities, not speed.
FAST_COMPILE = {'xla_backend_optimization_level': 0,
                'xla_llvm_disable_expensive_passes': True}


def run(name, **overrides):
  """`run_variant` with overrides that equal the defaults left out."""
  defaults = models.create(name, num_classes=10)
  return run_variant(name, **{
      k: v for k, v in sorted(overrides.items())
      if getattr(defaults, k, None) != v})


@functools.cache
def run_variant(name, **overrides):
  """Initialises a one-block-per-stage `name` and trains it for one step.

  Returns the model, its initial variables, the images, and from the step:
  the logits, the new batch statistics and `calls`, {module path: (input,
  output)} of every layer, block and stage. One compile per variant.
  """
  stages = 4 if num_classes_of(name) == 1000 else 3
  model = models.create(name, num_classes=10, stage_sizes=(1,) * stages,
                        num_filters=4, **overrides)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def init_and_step(key, images):
    variables = model.init(key, images, train=False)
    calls = {}

    def record(next_fun, args, kwargs, context):
      outputs = next_fun(*args, **kwargs)
      if context.method_name == '__call__':
        calls[context.module.path] = (args[0], outputs)
      return outputs

    with nn.intercept_methods(record):
      logits, state = model.apply(variables, images, train=True,
                                  mutable=['batch_stats'])
    return variables, logits, state['batch_stats'], calls

  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables, logits, batch_stats, calls = init_and_step(
      jax.random.key(0), images)
  return types.SimpleNamespace(
      model=model, variables=variables, images=images, logits=logits,
      batch_stats=batch_stats, calls=calls)


def blocks(calls):
  return sorted(p for p in calls if len(p) == 2 and 'block' in p[1])


def last_layer(calls, block, prefix):
  """The last `prefix` ('norm' or 'conv') layer inside the block."""
  return calls[max(p for p in calls if len(p) == 3 and p[:2] == block
                   and p[2].startswith(prefix) and p[2][-1].isdigit())]


TINY_NAMES = ['resnet20', 'resnet50']  # Basic and bottleneck blocks.


class TestCounts:

  @pytest.mark.parametrize('name', list(IMAGENET_PARAMS))
  def test_imagenet_params_match_reference(self, name):
    variables, _ = abstract(name)
    assert count(variables['params']) == IMAGENET_PARAMS[name]

  @pytest.mark.parametrize('name', list(CIFAR_PARAMS_M))
  def test_cifar_params_match_table6(self, name):
    millions = count(abstract(name)[0]['params']) / 1e6
    digits = 2 if millions < 1 else 1
    assert round(millions, digits) == CIFAR_PARAMS_M[name]

  @pytest.mark.parametrize('depth', [18, 50] + list(models.CIFAR_DEPTHS))
  def test_plain_equals_option_a_twin(self, depth):
    # The CIFAR family's default is option A already (and shares the cache).
    option_a = {} if depth in models.CIFAR_DEPTHS else {'shortcut': 'A'}
    plain = abstract(f'plain{depth}')[0]['params']
    residual = abstract(f'resnet{depth}', **option_a)[0]['params']
    assert count(plain) == count(residual)
    assert (jax.tree.map(lambda x: x.shape, plain)
            == jax.tree.map(lambda x: x.shape, residual))

  @pytest.mark.parametrize('name', list(IMAGENET_GMACS))
  def test_imagenet_macs_match_table1(self, name):
    summary = models.summary(models.create(name, num_classes=1000))
    assert summary.total_macs / 1e9 == pytest.approx(
        IMAGENET_GMACS[name], rel=0.05)
    assert summary.total_params == IMAGENET_PARAMS[name]

  def test_summary_rows(self):
    summary = models.summary(models.create('resnet50', num_classes=1000))
    assert [(r.name, r.output_shape) for r in summary.rows] == [
        ('stem', (56, 56, 64)), ('stage1', (56, 56, 256)),
        ('stage2', (28, 28, 512)), ('stage3', (14, 14, 1024)),
        ('stage4', (7, 7, 2048)), ('head', (1000,))]
    # Stem conv: 112 * 112 positions of a 7x7x3 kernel, 64 filters.
    assert summary.rows[0].macs == 112 * 112 * 7 * 7 * 3 * 64
    assert summary.rows[0].params == 7 * 7 * 3 * 64 + 2 * 64
    assert summary.rows[-1].params == 2048 * 1000 + 1000
    assert summary.rows[-1].macs == 2048 * 1000
    text = str(summary).splitlines()
    assert len({len(line) for line in text[:-1]}) == 1  # Aligned columns.
    assert '25,557,032' in text[-2] and 'stage4' in text[6]

  def test_v15_costs_more_than_v1(self):
    v1 = models.summary(models.create('resnet50', num_classes=1000))
    v15 = models.summary(
        models.create('resnet50', num_classes=1000, version='v1.5'))
    assert v15.total_params == v1.total_params
    assert v15.total_macs / 1e9 == pytest.approx(4.1, rel=0.02)


class TestShapes:

  @pytest.mark.parametrize('name', models.names())
  def test_every_name_gives_float32_logits(self, name):
    variables, logits = abstract(name)
    assert logits.shape == (2, num_classes_of(name))
    assert logits.dtype == jnp.float32
    assert set(variables) == {'params', 'batch_stats'}
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))

  def test_names(self):
    assert len(models.names()) == 24
    assert {'resnet18', 'resnet200', 'resnet1202', 'plain152',
            'plain20'} <= set(models.names())

  @pytest.mark.parametrize('name', ['resnet20', 'plain20', 'resnet50'])
  def test_real_forward_trains_batch_stats(self, name):
    r = run(name)
    assert r.logits.shape == (4, 10) and r.logits.dtype == jnp.float32
    assert np.isfinite(r.logits).all()
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b),
                           r.variables['batch_stats'], r.batch_stats)
    assert all(jax.tree.leaves(changed))


class TestShortcuts:

  @pytest.mark.parametrize('name', TINY_NAMES)
  def test_projection_layers_per_option(self, name):
    def projected(shortcut):
      model = models.create(name, num_classes=10, shortcut=shortcut,
                            stage_sizes=(1,) * stages, num_filters=4)
      params = jax.eval_shape(
          functools.partial(model.init, train=False), jax.random.key(0),
          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))['params']
      return sorted((s, b) for s in params if s.startswith('stage')
                    for b in params[s] if 'proj_conv' in params[s][b])
    stages = 4 if name == 'resnet50' else 3
    every = [(f'stage{i + 1}', 'block1') for i in range(stages)]
    assert projected('A') == []
    assert projected('C') == every
    # Option B projects where the shape changes: every first block here,
    # except resnet20's stage1, whose width and resolution stay the same.
    assert projected('B') == every[name == 'resnet20':]

  @pytest.mark.parametrize('name', ['resnet20', 'plain20', 'resnet50'])
  def test_block_output_is_branch_plus_shortcut(self, name):
    # resnet20 has option A, resnet50 option B.
    r = run(name)
    for block in blocks(r.calls):
      x, out = r.calls[block]
      branch = last_layer(r.calls, block, 'norm')[1]
      if name.startswith('plain'):
        expected = nn.relu(branch)
      elif block + ('proj_norm',) in r.calls:
        expected = nn.relu(branch + r.calls[block + ('proj_norm',)][1])
      else:
        strides = x.shape[1] // out.shape[1]
        expected = nn.relu(
            branch + models._pad_shortcut(x, out.shape[-1], strides))
      np.testing.assert_allclose(out, expected, atol=1e-5)

  def test_option_a_pads_and_subsamples(self):
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    y = models._pad_shortcut(x, 8, 2)
    assert y.shape == (2, 2, 2, 8)
    np.testing.assert_array_equal(y[..., :3], x[:, ::2, ::2])
    np.testing.assert_array_equal(y[..., 3:], 0)


class TestVariants:

  def test_v1_strides_first_conv_v15_the_3x3(self):
    v1, v15 = run('resnet50'), run('resnet50', version='v1.5')
    shape = lambda r, layer: r.calls[('stage2', 'block1', layer)][1].shape
    assert v1.calls[('stage2', 'block1')][0].shape[1:3] == (8, 8)
    assert [shape(v1, f'conv{i}')[1:3] for i in (1, 2, 3)] == [(4, 4)] * 3
    assert [shape(v15, f'conv{i}')[1:3] for i in (1, 2, 3)] == [
        (8, 8), (4, 4), (4, 4)]
    assert (jax.tree.map(jnp.shape, v1.variables)
            == jax.tree.map(jnp.shape, v15.variables))

  @pytest.mark.parametrize('name', TINY_NAMES)
  @pytest.mark.parametrize('preactivation', [False, True])
  def test_ordering(self, name, preactivation):
    r = run(name, preactivation=preactivation)
    for block in blocks(r.calls):
      x, out = r.calls[block]
      norm1 = r.calls[block + ('norm1',)]
      conv1 = r.calls[block + ('conv1',)]
      params = r.variables['params'][block[0]][block[1]]
      if preactivation:  # BN-ReLU-conv; identity addition, no ReLU after.
        np.testing.assert_array_equal(norm1[0], x)
        np.testing.assert_array_equal(conv1[0], nn.relu(norm1[1]))
        assert 'proj_norm' not in params
        if 'proj_conv' in params:  # Projects the activated input.
          np.testing.assert_array_equal(
              r.calls[block + ('proj_conv',)][0], conv1[0])
        assert (out < 0).any()
      else:  # conv-BN-ReLU; ReLU after the addition.
        np.testing.assert_array_equal(conv1[0], x)
        np.testing.assert_array_equal(norm1[0], conv1[1])
        assert ('proj_conv' in params) == ('proj_norm' in params)
        assert (out >= 0).all()
    assert ('head_norm' in r.variables['params']) == preactivation

  @pytest.mark.parametrize('name', TINY_NAMES)
  @pytest.mark.parametrize('preactivation', [False, True])
  def test_zero_init_residual_zeroes_every_branch(self, name, preactivation):
    # Pre-activation has no norm after the last conv: its kernel is zeroed.
    prefix = 'conv' if preactivation else 'norm'
    r = run(name, preactivation=preactivation, zero_init_residual=True)
    assert blocks(r.calls)
    for block in blocks(r.calls):
      np.testing.assert_array_equal(last_layer(r.calls, block, prefix)[1], 0)
      assert jnp.abs(r.calls[block][1]).max() > 0  # The shortcut carries on.
    # Without the option the branches are not zero.
    r = run(name, preactivation=preactivation)
    for block in blocks(r.calls):
      assert jnp.abs(last_layer(r.calls, block, prefix)[1]).max() > 0

  @pytest.mark.parametrize('name, dtype', [('resnet18', 'bfloat16'),
                                           ('resnet20', jnp.float16)])
  def test_half_precision_keeps_float32_params_and_logits(self, name, dtype):
    r = run(name, dtype=dtype)
    kinds = {x.dtype for x in jax.tree.leaves(
        (r.variables, r.batch_stats))}
    assert kinds == {jnp.dtype(jnp.float32)}
    assert r.logits.dtype == jnp.float32
    assert r.calls[('stage1', 'block1', 'conv1')][1].dtype == dtype
    assert r.calls[(f'stage{len(r.model.stage_sizes)}',)][1].dtype == dtype

  @pytest.mark.parametrize('groups', [None, [[0, 1], [2, 3]]])
  def test_cross_device_batch_norm(self, groups):
    assert jax.local_device_count() == 4, 'conftest sets 4 CPU devices'
    r = run('resnet20')
    sharded = models.create(
        'resnet20', num_classes=10, stage_sizes=(1, 1, 1), num_filters=4,
        axis_name='batch', axis_index_groups=groups)

    @functools.partial(jax.pmap, axis_name='batch')
    def step(variables, images):
      return sharded.apply(variables, images, train=True,
                           mutable=['batch_stats'])[1]['batch_stats']

    # [4 devices, 1 image each]; a group's statistics are those of its
    # devices' images together.
    replicated = jax.tree.map(lambda x: jnp.stack([x] * 4), r.variables)
    per_device = step(replicated, r.images[:, None])
    reference = jax.jit(functools.partial(
        r.model.apply, train=True, mutable=['batch_stats']),
        compiler_options=FAST_COMPILE)
    span = 4 if groups is None else 2
    for device in range(4):
      start = device // span * span
      _, state = reference(r.variables, r.images[start:start + span])
      jax.tree.map(
          functools.partial(np.testing.assert_allclose, rtol=1e-4,
                            atol=1e-5),
          jax.tree.map(lambda x: x[device], per_device),
          state['batch_stats'])


class TestErrors:

  def test_none_keeps_the_default(self):
    model = models.create('plain20', num_classes=10, shortcut=None,
                          version=None, num_filters=None)
    assert model.shortcut is None and model.num_filters == 16

  @pytest.mark.parametrize('name, overrides, words', [
      ('resnet19', {}, ['resnet19', 'resnet18', 'plain1202']),
      ('resnet20', {'width': 3}, ['width', 'num_filters', 'stage_sizes']),
      ('resnet20', {'shortcut': 'D'}, ["shortcut='D'", "'A', 'B', 'C'"]),
      ('plain20', {'shortcut': 'A'}, ["shortcut='A'", 'plain']),
      ('plain20', {'zero_init_residual': True}, ['zero_init_residual']),
      ('resnet50', {'version': 'v3'}, ["version='v3'", "'v1', 'v1.5'"]),
      ('resnet20', {'dtype': 'int8'}, ["dtype='int8'", 'bfloat16']),
      ('resnet20', {'dtype': 'foo'}, ["dtype='foo'", 'float16']),
      ('resnet20', {'num_filters': 0}, ['num_filters=0', 'positive int']),
      ('resnet20', {'num_filters': 2.5}, ['num_filters=2.5']),
      ('resnet20', {'stage_sizes': (1, 1)}, ['stage_sizes=(1, 1)', '3']),
      ('resnet50', {'stage_sizes': (1, 0, 1, 1)}, ['stage_sizes', '4']),
      ('resnet20', {'preactivation': 'yes'}, ["preactivation='yes'"]),
      ('resnet20', {'axis_index_groups': [[0, 1]]},
       ['axis_index_groups', 'axis_name']),
      ('resnet20', {'axis_name': 'batch', 'axis_index_groups': [[0], [1, 2]]},
       ['axis_index_groups', 'equal-sized']),
      ('resnet20', {'bn_momentum': 1.0}, ['bn_momentum=1.0', '[0, 1)']),
      ('resnet20', {'bn_epsilon': 0}, ['bn_epsilon=0']),
  ])
  def test_bad_create_arguments(self, name, overrides, words):
    with pytest.raises(ValueError) as error:
      models.create(name, num_classes=10, **overrides)
    for word in words:
      assert word in str(error.value)

  def test_bad_num_classes(self):
    with pytest.raises(ValueError, match='num_classes=0'):
      models.create('resnet20', num_classes=0)
