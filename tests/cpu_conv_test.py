"""Tests for resnet.cpu_conv: the same values and gradients as lax's conv."""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet import cpu_conv

DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def _grads(conv, images, kernel, strides, padding, **kwargs):
  def loss(x, w):
    out = conv(x, w, strides, padding, dimension_numbers=DIMENSIONS,
               **kwargs)
    return jnp.sum(jnp.sin(out.astype(jnp.float32))), out
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      images, kernel)


@pytest.mark.parametrize('size,in_features,out_features,window,stride,pad', [
    (8, 3, 5, 3, 1, 'SAME'),  # A 3x3 block conv.
    (9, 4, 6, 3, 2, ((1, 1), (1, 1))),  # Strided, odd size.
    (8, 4, 6, 1, 2, 'VALID'),  # A strided 1x1 projection.
    (16, 3, 8, 7, 2, ((3, 3), (3, 3))),  # The ImageNet stem.
])
def test_matches_lax_values_and_gradients(size, in_features, out_features,
                                          window, stride, pad):
  images = jax.random.normal(jax.random.PRNGKey(0),
                             (2, size, size, in_features))
  kernel = jax.random.normal(jax.random.PRNGKey(1),
                             (window, window, in_features, out_features))
  (_, expected), expected_grads = _grads(
      lax.conv_general_dilated, images, kernel, (stride, stride), pad)
  (_, got), got_grads = _grads(
      cpu_conv.conv_general_dilated, images, kernel, (stride, stride), pad)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  for got_grad, expected_grad in zip(got_grads, expected_grads):
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-4,
                               atol=1e-4)


def test_bfloat16_gradients_close_to_float32():
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 16, 8)) * 0.1
  _, expected = _grads(lax.conv_general_dilated, images, kernel, (1, 1),
                       'SAME')
  _, got = _grads(cpu_conv.conv_general_dilated,
                  images.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16),
                  (1, 1), 'SAME')
  assert got[1].dtype == jnp.bfloat16
  for got_grad, expected_grad in zip(got, expected):
    scale = float(jnp.abs(expected_grad).max())
    np.testing.assert_allclose(got_grad.astype(jnp.float32), expected_grad,
                               atol=0.05 * scale)


def test_grouped_conv_falls_back_to_lax():
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 6))
  expected = _grads(lax.conv_general_dilated, images, kernel, (1, 1),
                    'SAME', feature_group_count=2)[1]
  got = _grads(cpu_conv.conv_general_dilated, images, kernel, (1, 1),
               'SAME', feature_group_count=2)[1]
  for got_grad, expected_grad in zip(got, expected):
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-5,
                               atol=1e-5)


def test_flax_conv_accepts_it():
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  default = nn.Conv(4, (3, 3), strides=2, use_bias=False)
  fast = nn.Conv(4, (3, 3), strides=2, use_bias=False,
                 conv_general_dilated=cpu_conv.conv_general_dilated)
  params = default.init(jax.random.PRNGKey(1), images)

  def grads(module):
    return jax.grad(lambda p: jnp.sum(module.apply(p, images)**2))(params)

  np.testing.assert_allclose(
      grads(fast)['params']['kernel'], grads(default)['params']['kernel'],
      rtol=1e-4, atol=1e-4)


def test_environment_turns_it_off(monkeypatch):
  assert cpu_conv.enabled()  # The tests run on CPU.
  monkeypatch.setenv(cpu_conv.ENV, '0')
  assert not cpu_conv.enabled()
  images = jnp.ones((1, 4, 4, 2))
  kernel = jnp.ones((3, 3, 2, 2))
  jaxpr = jax.make_jaxpr(jax.grad(lambda w: jnp.sum(
      cpu_conv.conv_general_dilated(images, w, (1, 1), 'SAME',
                                    dimension_numbers=DIMENSIONS))))(kernel)
  assert 'concatenate' not in str(jaxpr)  # No stacked windows.
  monkeypatch.delenv(cpu_conv.ENV)
  jaxpr = jax.make_jaxpr(jax.grad(lambda w: jnp.sum(
      cpu_conv.conv_general_dilated(images, w, (1, 1), 'SAME',
                                    dimension_numbers=DIMENSIONS))))(kernel)
  assert 'concatenate' in str(jaxpr)
