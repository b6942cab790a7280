"""Tests for resnet.cpu_ops: the same values and gradients as lax's conv
and flax's max pool under every strategy, and the strategy each setting
picks."""

import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet import cpu_ops
from resnet import models

DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def _grads(conv, images, kernel, strides, padding, **kwargs):
  def loss(x, w):
    out = conv(x, w, strides, padding, dimension_numbers=DIMENSIONS,
               **kwargs)
    return jnp.sum(jnp.sin(out.astype(jnp.float32))), out
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      images, kernel)


def _gradient_jaxpr(kernel_shape, strides=(1, 1)) -> str:
  images = jnp.ones((1, 4, 4, kernel_shape[2]))
  return str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(
      cpu_ops.conv_general_dilated(images, w, strides, 'SAME',
                                    dimension_numbers=DIMENSIONS))))(
                                        jnp.ones(kernel_shape)))


@pytest.mark.parametrize('strategy', ['dot', 'im2col'])
@pytest.mark.parametrize('size,in_features,out_features,window,stride,pad', [
    (8, 3, 5, 3, 1, 'SAME'),  # A 3x3 block conv.
    (9, 4, 6, 3, 2, ((1, 1), (1, 1))),  # Strided, odd size.
    (8, 4, 6, 1, 1, ((0, 0), (0, 0))),  # A bottleneck's 1x1 conv.
    (8, 4, 6, 1, 2, 'VALID'),  # A strided 1x1 projection.
    (9, 4, 6, 1, 2, 'SAME'),  # Odd size: SAME is unpadded for 1x1.
    (6, 4, 6, 1, 1, ((1, 1), (1, 1))),  # A padded 1x1 conv (rare).
    (16, 3, 8, 7, 2, ((3, 3), (3, 3))),  # The ImageNet stem.
])
def test_matches_lax_values_and_gradients(monkeypatch, strategy, size,
                                          in_features, out_features, window,
                                          stride, pad):
  monkeypatch.setenv(cpu_ops.ENV, strategy)
  images = jax.random.normal(jax.random.PRNGKey(0),
                             (2, size, size, in_features))
  kernel = jax.random.normal(jax.random.PRNGKey(1),
                             (window, window, in_features, out_features))
  (_, expected), expected_grads = _grads(
      lax.conv_general_dilated, images, kernel, (stride, stride), pad)
  (_, got), got_grads = _grads(
      cpu_ops.conv_general_dilated, images, kernel, (stride, stride), pad)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  for got_grad, expected_grad in zip(got_grads, expected_grads):
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize('strategy', ['dot', 'im2col'])
@pytest.mark.parametrize('window', [1, 3])
def test_bfloat16_gradients_close_to_float32(monkeypatch, strategy, window):
  monkeypatch.setenv(cpu_ops.ENV, strategy)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16))
  kernel = jax.random.normal(jax.random.PRNGKey(1),
                             (window, window, 16, 8)) * 0.1
  _, expected = _grads(lax.conv_general_dilated, images, kernel, (1, 1),
                       'SAME')
  _, got = _grads(cpu_ops.conv_general_dilated,
                  images.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16),
                  (1, 1), 'SAME')
  assert got[0].dtype == got[1].dtype == jnp.bfloat16
  for got_grad, expected_grad in zip(got, expected):
    scale = float(jnp.abs(expected_grad).max())
    np.testing.assert_allclose(got_grad.astype(jnp.float32), expected_grad,
                               atol=0.05 * scale)


def test_grouped_conv_falls_back_to_lax(monkeypatch):
  monkeypatch.setenv(cpu_ops.ENV, 'im2col')
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 2, 6))
  expected = _grads(lax.conv_general_dilated, images, kernel, (1, 1),
                    'SAME', feature_group_count=2)[1]
  got = _grads(cpu_ops.conv_general_dilated, images, kernel, (1, 1),
               'SAME', feature_group_count=2)[1]
  for got_grad, expected_grad in zip(got, expected):
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-5,
                               atol=1e-5)


def test_flax_conv_accepts_it():
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  for window in (1, 3):
    default = nn.Conv(4, (window, window), strides=2, use_bias=False)
    fast = nn.Conv(4, (window, window), strides=2, use_bias=False,
                   conv_general_dilated=cpu_ops.conv_general_dilated)
    params = default.init(jax.random.PRNGKey(1), images)

    def grads(module):
      return jax.grad(lambda p: jnp.sum(module.apply(p, images)**2))(params)

    np.testing.assert_allclose(
        grads(fast)['params']['kernel'], grads(default)['params']['kernel'],
        rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('strategy', ['dot', 'xla'])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_max_pool_matches_flax(monkeypatch, strategy, dtype):
  monkeypatch.setenv(cpu_ops.ENV, strategy)
  # Odd and even sizes; the ReLU makes ties at zero, as in the stem, and
  # bfloat16 ties among positive values.
  for size in (9, 16):
    x = jax.random.normal(jax.random.PRNGKey(size), (2, size, size, 3))
    def pooled(pool, x):
      y = pool(jax.nn.relu(x.astype(dtype)), (3, 3), (2, 2),
               padding=((1, 1), (1, 1)))
      return jnp.sum(jnp.sin(y.astype(jnp.float32))), y
    (_, expected), expected_grad = jax.value_and_grad(
        functools.partial(pooled, nn.max_pool), has_aux=True)(x)
    (_, got), got_grad = jax.value_and_grad(
        functools.partial(pooled, cpu_ops.max_pool), has_aux=True)(x)
    assert got.dtype == expected.dtype == dtype
    np.testing.assert_array_equal(got, expected)
    # Where windows overlap, flax sums the gradient in bfloat16, cpu_ops in
    # float32; where maxima tie, both give it to the first alone.
    tolerance = 1e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(got_grad, expected_grad, rtol=tolerance,
                               atol=tolerance)


def test_each_strategy_writes_the_expected_program(monkeypatch):
  pool = lambda x: jnp.sum(cpu_ops.max_pool(x, (3, 3), (2, 2),
                                            ((1, 1), (1, 1))))
  pool_jaxpr = lambda: str(jax.make_jaxpr(jax.grad(pool))(jnp.ones(
      (1, 4, 4, 2))))
  monkeypatch.setenv(cpu_ops.ENV, 'xla')
  assert 'dot_general' not in _gradient_jaxpr((1, 1, 2, 3))
  assert 'select_and_scatter' in pool_jaxpr()
  assert 'concatenate' not in _gradient_jaxpr((3, 3, 2, 3))

  monkeypatch.setenv(cpu_ops.ENV, 'dot')
  pointwise = _gradient_jaxpr((1, 1, 2, 3), strides=(2, 2))
  assert 'dot_general' in pointwise and 'conv_general' not in pointwise
  assert 'select_and_scatter' not in pool_jaxpr()
  assert 'concatenate' not in _gradient_jaxpr((3, 3, 2, 3))

  monkeypatch.setenv(cpu_ops.ENV, 'im2col')
  assert 'conv_general' not in _gradient_jaxpr((1, 1, 2, 3))
  assert 'concatenate' in _gradient_jaxpr((3, 3, 2, 3))  # Stacked windows.


@pytest.mark.parametrize('text,avx512,expected', [
    (None, True, 'dot'), (None, False, 'im2col'), ('auto', True, 'dot'),
    (' AUTO ', False, 'im2col'), ('dot', False, 'dot'),
    ('im2col', True, 'im2col'), ('xla', True, 'xla'), ('0', False, 'xla'),
])
def test_mode_follows_the_setting_and_the_host(monkeypatch, text, avx512,
                                               expected):
  monkeypatch.setattr(cpu_ops, '_has_avx512', lambda: avx512)
  if text is None:
    monkeypatch.delenv(cpu_ops.ENV, raising=False)
  else:
    monkeypatch.setenv(cpu_ops.ENV, text)
  assert cpu_ops.mode() == expected  # The tests run on CPU.
  assert cpu_ops.enabled() == (expected != 'xla')


def test_unknown_setting_is_rejected_with_the_accepted_ones(monkeypatch):
  monkeypatch.setenv(cpu_ops.ENV, 'fast')
  with pytest.raises(ValueError, match=r"RESNET_CPU_OPS='fast'.*im2col"):
    cpu_ops.mode()


@pytest.mark.parametrize('strategy', ['dot', 'xla'])
def test_materialize_is_the_identity_in_value_and_gradient(monkeypatch,
                                                           strategy):
  monkeypatch.setenv(cpu_ops.ENV, strategy)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 4))
  # A NaN first entry takes the other branch, which is x too.
  nan_first = x.at[0, 0, 0, 0].set(jnp.nan)
  for value in (x, nan_first, x.astype(jnp.bfloat16)):
    np.testing.assert_array_equal(
        jax.jit(cpu_ops.materialize)(value), value)
  loss = lambda f: lambda v: jnp.sum(jnp.sin(f(v)) * v)
  np.testing.assert_allclose(jax.grad(loss(cpu_ops.materialize))(x),
                             jax.grad(loss(lambda v: v))(x), rtol=1e-6)


def test_materialize_writes_a_conditional_on_cpu_only_when_enabled(
    monkeypatch):
  x = jnp.ones((1, 2, 2, 3))
  program = lambda: str(jax.make_jaxpr(jax.grad(
      lambda v: jnp.sum(cpu_ops.materialize(v) ** 2)))(x))
  monkeypatch.setenv(cpu_ops.ENV, 'dot')
  assert program().count('cond[') == 2  # Forward and gradient.
  monkeypatch.setenv(cpu_ops.ENV, 'xla')
  assert 'cond' not in program()
  assert cpu_ops.materialize(x) is x


# Sizes that leave BatchNorm at least 16 values per channel in every stage:
# over fewer, normalisation magnifies rounding differences.
@pytest.mark.parametrize('name,overrides,size', [
    ('resnet20', {'stage_sizes': (1, 1, 1), 'num_filters': 4}, 16),
    ('resnet50', {'stage_sizes': (1, 1, 1, 1), 'num_filters': 4}, 64),
])
def test_whole_network_is_the_same_under_every_strategy(monkeypatch, name,
                                                        overrides, size):
  images = jax.random.normal(jax.random.PRNGKey(0), (4, size, size, 3))
  model = models.create(name, num_classes=3, **overrides)

  def outputs(strategy):
    monkeypatch.setenv(cpu_ops.ENV, strategy)
    variables = model.init(jax.random.PRNGKey(1), images, train=False)

    def loss(params):
      logits, updated = model.apply(
          {**variables, 'params': params}, images, train=True,
          mutable=['batch_stats'])
      return jnp.sum(jnp.sin(logits)), (logits, updated)
    (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(
        variables['params'])
    return aux, grads

  expected = outputs('xla')
  for strategy in ('dot', 'im2col'):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4,
                                   atol=1e-5), outputs(strategy), expected)
