"""Tests for resnet.optim: learning-rate schedules and weight decay."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from resnet import optim


def _config(**fields):
  config = common.get_config()
  config.update(fields)
  return config


class TestSchedules:

  def test_piecewise_divides_at_absolute_steps(self):
    config = _config(learning_rate=0.1, boundaries_steps=(32_000, 48_000))
    fn = optim.create_learning_rate_fn(config, 390, 64_000)
    rates = [float(fn(s)) for s in (0, 31_999, 32_000, 47_999, 48_000,
                                    63_999)]
    np.testing.assert_allclose(
        rates, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)

  def test_boundaries_in_epochs(self):
    config = _config(boundaries_epochs=(30.0, 60.0))
    fn = optim.create_learning_rate_fn(config, 100, 9_000)
    np.testing.assert_allclose(
        [float(fn(s)) for s in (2_999, 3_000, 6_000)], [0.1, 0.01, 0.001],
        rtol=1e-6)

  def test_constant_warmup_is_the_papers_resnet110_start(self):
    config = _config(boundaries_steps=(32_000, 48_000), warmup_steps=400,
                     warmup_mode='constant', warmup_learning_rate=0.01)
    fn = optim.create_learning_rate_fn(config, 390, 64_000)
    np.testing.assert_allclose(
        [float(fn(s)) for s in (0, 399, 400, 32_000)],
        [0.01, 0.01, 0.1, 0.01], rtol=1e-6)

  def test_linear_warmup_then_cosine_to_zero(self):
    config = _config(schedule='cosine', learning_rate=0.4, warmup_epochs=5.0,
                     warmup_learning_rate=0.0)
    fn = optim.create_learning_rate_fn(config, 10, 100)
    np.testing.assert_allclose(
        [float(fn(s)) for s in (0, 25, 50, 75, 100)],
        [0.0, 0.2, 0.4, 0.2, 0.0], atol=1e-6)

  def test_constant(self):
    fn = optim.create_learning_rate_fn(
        _config(schedule='constant', learning_rate=0.05), 10, 100)
    assert float(fn(0)) == float(fn(99)) == pytest.approx(0.05)

  @pytest.mark.parametrize('fields, message', [
      (dict(schedule='step'), 'config.schedule'),
      (dict(warmup_mode='exp'), 'config.warmup_mode'),
      (dict(learning_rate=0.0), 'config.learning_rate=0.0'),
      (dict(learning_rate=-0.1), 'config.learning_rate=-0.1'),
      (dict(boundaries_steps=(50, 20)), 'strictly increasing'),
      (dict(boundaries_steps=(5,), boundaries_epochs=(1.0,)), 'only one'),
      (dict(warmup_steps=100), 'warm-up'),
  ])
  def test_rejects(self, fields, message):
    with pytest.raises(ValueError, match=message):
      optim.create_learning_rate_fn(_config(**fields), 10, 100)


PARAMS = {
    'stem_conv': {'kernel': jnp.ones((3, 3, 3, 4))},
    'stem_norm': {'scale': jnp.ones(4), 'bias': jnp.ones(4)},
    'head': {'kernel': jnp.ones((4, 10)), 'bias': jnp.ones(10)},
}


class TestWeightDecay:

  def test_mask_decays_only_kernels(self):
    mask = optim.weight_decay_mask(PARAMS)
    assert mask == {
        'stem_conv': {'kernel': True},
        'stem_norm': {'scale': False, 'bias': False},
        'head': {'kernel': True, 'bias': False},
    }

  def test_mask_can_decay_everything(self):
    mask = optim.weight_decay_mask(PARAMS, decay_batchnorm_and_bias=True)
    assert all(jax.tree.leaves(mask))

  def _first_two_updates(self, **fields):
    config = _config(momentum=0.9, weight_decay=0.5, **fields)
    tx = optim.create_optimizer(config)
    grads = jax.tree.map(jnp.zeros_like, PARAMS)
    state = tx.init(PARAMS)
    first, state = tx.update(grads, state, PARAMS)
    second, _ = tx.update(grads, state, PARAMS)
    return first, second

  def test_coupled_decay_goes_through_momentum(self):
    # L2 in the gradient: g = 0.5 w, then momentum: 0.5, 0.5 + 0.9 * 0.5.
    first, second = self._first_two_updates(weight_decay_mode='coupled')
    np.testing.assert_allclose(first['head']['kernel'], -0.5)
    np.testing.assert_allclose(second['head']['kernel'], -0.95)
    np.testing.assert_allclose(second['head']['bias'], 0.0)
    np.testing.assert_allclose(second['stem_norm']['scale'], 0.0)

  def test_decoupled_decay_skips_momentum(self):
    first, second = self._first_two_updates(weight_decay_mode='decoupled')
    np.testing.assert_allclose(first['head']['kernel'], -0.5)
    np.testing.assert_allclose(second['head']['kernel'], -0.5)
    np.testing.assert_allclose(second['stem_norm']['bias'], 0.0)

  def test_nesterov_and_clipping(self):
    config = _config(weight_decay=0.0, nesterov=True, grad_clip_norm=1.0)
    tx = optim.create_optimizer(config)
    grads = {'w': jnp.full((4,), 10.0)}  # Global norm 20, clipped to 1.
    updates, _ = tx.update(grads, tx.init(grads), grads)
    # Nesterov's first step: g + 0.9 * g with g the clipped gradient 0.5.
    np.testing.assert_allclose(updates['w'], -0.95, rtol=1e-6)

  @pytest.mark.parametrize('fields, message', [
      (dict(optimizer='adam'), "config.optimizer='adam'"),
      (dict(weight_decay_mode='l1'), 'config.weight_decay_mode'),
      (dict(weight_decay=-1e-4), 'config.weight_decay'),
      (dict(momentum=1.0), 'config.momentum'),
  ])
  def test_rejects(self, fields, message):
    with pytest.raises(ValueError, match=message):
      optim.create_optimizer(_config(**fields))
