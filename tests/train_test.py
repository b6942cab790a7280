"""Tests for resnet.train: the steps, the loop, checkpoints and validation.

The steps run pmapped over four simulated CPU devices (tests/conftest.py),
so gradient averaging and cross-device BatchNorm really run. End-to-end runs
use configs/default.py:tiny on the digits and are shared between tests.
"""

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from resnet import checkpoint
from resnet import optim
from resnet import reporting
from resnet import train

IMAGE_SHAPE = (8, 8, 3)
GLOBAL_BATCH = 16


class TinyNet(nn.Module):
  """Conv, BatchNorm over 'batch', ReLU, pool, dense: enough for steps."""
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, images, *, train):
    x = nn.Conv(8, (3, 3), use_bias=False, dtype=self.dtype)(images)
    x = nn.BatchNorm(use_running_average=not train, axis_name='batch',
                     dtype=self.dtype)(x)
    x = jnp.mean(nn.relu(x).astype(jnp.float32), axis=(1, 2))
    return nn.Dense(10)(x)


def _config(**fields):
  config = default.get_config('tiny')
  config.update(fields)
  return config


def _fixed_batch(num_devices, nan=False):
  rng = np.random.RandomState(0)
  images = rng.normal(size=(GLOBAL_BATCH, *IMAGE_SHAPE)).astype(np.float32)
  labels = rng.randint(0, 10, size=GLOBAL_BATCH).astype(np.int32)
  if nan:
    images[0, 0, 0, 0] = np.nan
  # [global batch, ...] -> [devices, per-device batch, ...]
  return {k: v.reshape(num_devices, -1, *v.shape[1:])
          for k, v in (('image', images), ('label', labels))}


def _run_steps(config, model, num_devices, num_steps, nan=False):
  """Steps on one fixed batch: (host state, losses, last step's sums)."""
  devices = jax.local_devices()[:num_devices]
  tx = optim.create_optimizer(config)
  learning_rate_fn = optim.create_learning_rate_fn(config, 10, 100)
  state = train.create_train_state(config, model, tx, IMAGE_SHAPE)
  state = train.replicate(state, devices)
  p_train_step = train.make_p_train_step(
      model, tx, learning_rate_fn, config.label_smoothing, devices=devices)
  # The leading axis of each array is split over the devices, as pmap wants.
  sharding = jax.NamedSharding(jax.sharding.Mesh(np.array(devices), ('d',)),
                               jax.P('d'))
  batch = jax.device_put(_fixed_batch(num_devices, nan), sharding)
  losses, sums = [], None
  for _ in range(num_steps):
    sums = train.replicate(train.zero_train_metrics(), devices)
    state, sums = p_train_step(state, sums, batch)
    sums = checkpoint.to_host(sums)
    losses.append(float(sums['loss_sum'] / sums['count']))
  return checkpoint.to_host(state), losses, sums


def _assert_trees_close(a, b, **tolerance):
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, **tolerance), a, b)


class TestSteps:

  @pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
  def test_train_step_lowers_the_loss_on_a_fixed_batch(self, dtype):
    config = _config(half_precision=dtype != 'float32',
                     half_precision_dtype=dtype, schedule='constant',
                     warmup_steps=0, learning_rate=0.5)
    state, losses, sums = _run_steps(config, TinyNet(dtype), 4, 8)
    assert losses[-1] < 0.8 * losses[0], losses
    assert int(state.step) == 8 and int(sums['skipped_steps']) == 0
    # Mixed precision computes in half but keeps float32 parameters.
    for leaf in jax.tree.leaves((state.params, state.batch_stats,
                                 state.opt_state)):
      assert leaf.dtype == jnp.float32

  def test_one_and_four_devices_agree(self):
    # The same global batch on 1 device or split over 4: averaged gradients
    # and BatchNorm statistics over 'batch' give the same parameters.
    config = _config(schedule='constant', warmup_steps=0)
    one, losses_one, _ = _run_steps(config, TinyNet(), 1, 3)
    four, losses_four, _ = _run_steps(config, TinyNet(), 4, 3)
    np.testing.assert_allclose(losses_one, losses_four, rtol=1e-5)
    _assert_trees_close(one.params, four.params, rtol=1e-4, atol=1e-6)
    _assert_trees_close(one.batch_stats, four.batch_stats,
                        rtol=1e-4, atol=1e-6)
    assert not np.allclose(one.batch_stats['BatchNorm_0']['var'], 1.0)

  def test_non_finite_step_is_skipped_and_counted(self):
    config = _config(schedule='constant', warmup_steps=0)
    initial, _, _ = _run_steps(config, TinyNet(), 4, 0)
    state, _, sums = _run_steps(config, TinyNet(), 4, 1, nan=True)
    assert int(sums['skipped_steps']) == 1 and int(state.step) == 1
    _assert_trees_close(state.params, initial.params, rtol=0, atol=0)

  def test_float16_scales_the_loss_dynamically(self):
    config = _config(half_precision=True, half_precision_dtype='float16',
                     schedule='constant', warmup_steps=0)
    state, losses, sums = _run_steps(config, TinyNet('float16'), 4, 3)
    assert state.dynamic_scale is not None
    assert int(state.dynamic_scale.fin_steps) == 3
    assert np.isfinite(losses).all() and int(sums['skipped_steps']) == 0
    assert all(leaf.dtype == jnp.float32
               for leaf in jax.tree.leaves(state.params))


NUM_STEPS = 6  # configs/default.py:tiny
TRAIN_KEYS = {'train/loss', 'train/accuracy', 'train/learning_rate',
              'train/skipped_steps', 'steps_per_sec', 'examples_per_sec',
              'input_wait_fraction'}
EVAL_KEYS = {'eval/loss', 'eval/accuracy', 'eval/top5_accuracy',
             'eval/num_examples'}
DIGITS_TEST_EXAMPLES = 360


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """The tiny config trained for its 6 steps in one go."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  state = train.train_and_evaluate(_config(), workdir)
  return workdir, checkpoint.to_host(state)


@pytest.fixture(scope='module')
def resumed(tmp_path_factory):
  """The same run stopped after 3 steps, then restarted to finish."""
  workdir = str(tmp_path_factory.mktemp('resumed'))
  train.train_and_evaluate(_config(num_train_steps=3), workdir)
  state = train.train_and_evaluate(_config(), workdir)
  return workdir, checkpoint.to_host(state)


class TestTrainAndEvaluate:

  def test_metrics_file_holds_the_documented_keys(self, uninterrupted):
    workdir, _ = uninterrupted
    records = reporting.read_metrics(workdir)
    train_records = [r for r in records if 'train/loss' in r]
    eval_records = [r for r in records if 'eval/loss' in r]
    assert [r['step'] for r in train_records] == [2, 4, 6]
    for record in train_records:
      assert set(record) == TRAIN_KEYS | {'step'}
    assert [r['step'] for r in eval_records] == [NUM_STEPS]
    assert set(eval_records[0]) == EVAL_KEYS | {'step'}
    # Every test example is scored once, the padding of the last batch not.
    assert eval_records[0]['eval/num_examples'] == DIGITS_TEST_EXAMPLES
    assert 0 <= eval_records[0]['eval/accuracy'] <= 1

  def test_workdir_holds_config_done_and_checkpoints(self, uninterrupted):
    workdir, state = uninterrupted
    done = json.loads((pathlib.Path(workdir) / 'done.json').read_text())
    assert done['step'] == NUM_STEPS == int(state.step)
    assert done['eval/num_examples'] == DIGITS_TEST_EXAMPLES
    saved = json.loads((pathlib.Path(workdir) / 'config.json').read_text())
    assert saved['stage_sizes'] == [1, 1, 1]
    steps = sorted(int(p.name) for p in
                   (pathlib.Path(workdir) / 'checkpoints').iterdir())
    assert steps == [3, 6]
    assert list(pathlib.Path(workdir).glob('events.out.tfevents.*'))

  def test_restarted_run_ends_bit_identical(self, uninterrupted, resumed):
    (_, expected), (workdir, state) = uninterrupted, resumed
    assert int(state.step) == NUM_STEPS
    jax.tree.map(np.testing.assert_array_equal,
                 (expected.params, expected.batch_stats, expected.opt_state,
                  expected.rng),
                 (state.params, state.batch_stats, state.opt_state,
                  state.rng))
    # The second part logged its own steps after the first part's.
    steps = [r['step'] for r in reporting.read_metrics(workdir)
             if 'train/loss' in r]
    assert steps == [2, 3, 4, 6]

  def test_restart_with_another_model_is_refused(self, resumed):
    workdir, _ = resumed
    with pytest.raises(ValueError, match=r'num_filters: 4 -> 8'):
      train.train_and_evaluate(_config(num_filters=8), workdir)


class TestValidation:

  @pytest.mark.parametrize('fields, message', [
      (dict(model='resnet21'), "Unknown model name 'resnet21'"),
      (dict(dataset='no_such_dataset'), "dataset='no_such_dataset'"),
      (dict(optimizer='adam'), "config.optimizer='adam'"),
      (dict(schedule='step'), "config.schedule='step'"),
      (dict(batch_size=0), 'config.batch_size=0 must be positive'),
      (dict(batch_size=-32), 'config.batch_size=-32 must be positive'),
      (dict(batch_size=30), 'batch_size=30 is not divisible by the 4'),
      (dict(eval_batch_size=30), 'eval_batch_size=30 is not divisible'),
      (dict(learning_rate=0.0), 'config.learning_rate=0.0 must be positive'),
      (dict(learning_rate=-0.1), 'config.learning_rate=-0.1'),
      (dict(num_train_steps=-1), 'config.num_train_steps=-1'),
      (dict(num_train_steps=0, num_epochs=0.0), 'config.num_epochs=0.0'),
      (dict(num_epochs=-1.0), 'config.num_epochs=-1.0'),
      (dict(half_precision_dtype='float8'), 'half_precision_dtype'),
  ])
  def test_bad_config_is_refused_before_anything_runs(
      self, tmp_path, fields, message):
    workdir = tmp_path / 'run'
    with pytest.raises(ValueError, match=message):
      train.train_and_evaluate(_config(**fields), str(workdir))
    assert not workdir.exists()

  def test_workdir_that_is_a_file_is_refused(self, tmp_path):
    path = tmp_path / 'a_file'
    path.write_text('')
    with pytest.raises(ValueError, match='is an existing file'):
      train.train_and_evaluate(_config(), str(path))

  def test_mistyped_config_field_fails_on_the_command_line(self, tmp_path):
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, 'train.py', '--config=configs/default.py:tiny',
         f'--workdir={tmp_path / "run"}', '--config.learning_rat=0.2'],
        cwd=root, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode != 0
    assert 'learning_rat' in result.stderr
    assert not (tmp_path / 'run').exists()
