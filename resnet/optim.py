"""Optimizer and learning-rate schedules: SGD with momentum and weight decay.

The learning rate is not part of the optax chain: the train step multiplies
the chain's update by `learning_rate_fn(step)`, so the schedule follows the
step counter even when a non-finite step leaves the optimizer state untouched.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ('sgd',)
SCHEDULES = ('piecewise', 'cosine', 'constant')
WARMUP_MODES = ('linear', 'constant')
WEIGHT_DECAY_MODES = ('coupled', 'decoupled')

LearningRateFn = Callable[[jax.Array], jax.Array]


def _check_choice(config: ml_collections.ConfigDict, field: str, accepted):
  value = config[field]
  if value not in accepted:
    raise ValueError(
        f'config.{field}={value!r} is not supported; accepted: '
        f'{", ".join(repr(a) for a in accepted)}.')


def warmup_steps(config: ml_collections.ConfigDict,
                 steps_per_epoch: int) -> int:
  """Length of the warm-up in steps: `warmup_steps`, else from epochs."""
  if config.warmup_steps > 0:
    return int(config.warmup_steps)
  return int(round(config.warmup_epochs * steps_per_epoch))


def boundaries_steps(config: ml_collections.ConfigDict,
                     steps_per_epoch: int) -> tuple[int, ...]:
  """Steps at which the piecewise schedule multiplies by `decay_factor`."""
  if config.boundaries_steps and config.boundaries_epochs:
    raise ValueError(
        'config.boundaries_steps and config.boundaries_epochs are both set '
        f'({tuple(config.boundaries_steps)} and '
        f'{tuple(config.boundaries_epochs)}); set only one.')
  if config.boundaries_epochs:
    return tuple(int(round(e * steps_per_epoch))
                 for e in config.boundaries_epochs)
  return tuple(int(s) for s in config.boundaries_steps)


def create_learning_rate_fn(config: ml_collections.ConfigDict,
                            steps_per_epoch: int,
                            num_train_steps: int) -> LearningRateFn:
  """Learning rate as a function of the (0-based) step.

  The main schedule counts steps from the start of training, warm-up
  included, so piecewise boundaries are absolute iteration numbers as in the
  paper (32k and 48k on CIFAR); cosine decays from the end of the warm-up to
  zero at `num_train_steps`. During the warm-up the rate either rises
  linearly from `warmup_learning_rate` to `learning_rate`, or stays at
  `warmup_learning_rate` ('constant': the paper's ResNet-110 start at 0.01).

  Raises:
    ValueError: unknown schedule or warm-up mode, non-positive learning rate,
      or boundaries that are not increasing inside the run.
  """
  _check_choice(config, 'schedule', SCHEDULES)
  _check_choice(config, 'warmup_mode', WARMUP_MODES)
  if config.learning_rate <= 0:
    raise ValueError(
        f'config.learning_rate={config.learning_rate} must be positive.')
  if config.warmup_learning_rate < 0:
    raise ValueError(
        f'config.warmup_learning_rate={config.warmup_learning_rate} must be '
        'zero or positive.')
  peak = config.learning_rate
  num_warmup = warmup_steps(config, steps_per_epoch)
  if not 0 <= num_warmup < num_train_steps:
    raise ValueError(
        f'the warm-up lasts {num_warmup} steps (config.warmup_steps='
        f'{config.warmup_steps}, config.warmup_epochs={config.warmup_epochs})'
        f'; accepted: 0 to fewer than num_train_steps={num_train_steps}.')

  if config.schedule == 'piecewise':
    bounds = boundaries_steps(config, steps_per_epoch)
    if list(bounds) != sorted(set(bounds)) or any(b <= 0 for b in bounds):
      raise ValueError(
          f'piecewise boundaries {bounds} (in steps) must be positive and '
          'strictly increasing.')
    main = optax.piecewise_constant_schedule(
        peak, {b: config.decay_factor for b in bounds})
  elif config.schedule == 'cosine':
    cosine = optax.cosine_decay_schedule(peak, num_train_steps - num_warmup)
    main = lambda step: cosine(step - num_warmup)
  else:
    main = lambda step: jnp.asarray(peak, jnp.float32)

  if num_warmup == 0:
    return main
  if config.warmup_mode == 'linear':
    warmup = optax.linear_schedule(
        config.warmup_learning_rate, peak, num_warmup)
  else:
    warmup = lambda step: jnp.asarray(config.warmup_learning_rate,
                                      jnp.float32)

  def learning_rate_fn(step):
    return jnp.where(step < num_warmup, warmup(step), main(step))

  return learning_rate_fn


def weight_decay_mask(params, decay_batchnorm_and_bias: bool = False):
  """True for the leaves that weight decay applies to.

  The paper decays the conv and dense weights (`kernel` leaves); BatchNorm
  scales and offsets and the head's bias are exempt unless
  `decay_batchnorm_and_bias` is set.
  """
  def is_decayed(path, _):
    return decay_batchnorm_and_bias or path[-1].key == 'kernel'

  return jax.tree_util.tree_map_with_path(is_decayed, params)


def create_optimizer(
    config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """SGD with momentum, weight decay and optional clipping, for a unit rate.

  The chain's update is the descent direction for a learning rate of 1; the
  train step scales it by the scheduled rate.

  - 'coupled' decay adds `weight_decay * w` to the gradient before momentum,
    the L2 regularisation of the paper (and of PyTorch's SGD).
  - 'decoupled' decay adds it after the momentum, so it is only scaled by
    the learning rate (SGDW, Loshchilov and Hutter).
  Gradients are clipped by global norm first when `grad_clip_norm` > 0.

  Raises:
    ValueError: unknown optimizer or weight decay mode, or a negative
      momentum, weight decay or clipping norm.
  """
  _check_choice(config, 'optimizer', OPTIMIZERS)
  _check_choice(config, 'weight_decay_mode', WEIGHT_DECAY_MODES)
  for field in ('momentum', 'weight_decay', 'grad_clip_norm',
                'label_smoothing'):
    if config[field] < 0:
      raise ValueError(
          f'config.{field}={config[field]} must be zero or positive.')
  if config.momentum >= 1:
    raise ValueError(
        f'config.momentum={config.momentum} must be below 1.')

  def decay(mode):
    # Both slots exist in either mode (the other at rate 0), so the
    # optimizer state has one structure and checkpoints restore across
    # changes of these fields.
    rate = config.weight_decay if config.weight_decay_mode == mode else 0.0
    return optax.add_decayed_weights(
        rate, mask=lambda p: weight_decay_mask(
            p, config.decay_batchnorm_and_bias))

  clip = (optax.clip_by_global_norm(config.grad_clip_norm)
          if config.grad_clip_norm > 0 else optax.identity())
  return optax.chain(
      clip,
      decay('coupled'),
      optax.trace(config.momentum, nesterov=config.nesterov),
      decay('decoupled'),
      optax.scale(-1.0))
