"""ResNet-20 on the embedded digits data set: the quick run on a CPU.

Trains the CIFAR ResNet-20 of He et al. (2015) on scikit-learn's digits
(1,437 train / 360 test images served at 32x32), with the paper's CIFAR
optimizer, and reaches at least 98% top-1 on the test split in a few minutes
on 2 CPU cores:

  python train.py --config=configs/default.py --workdir=runs/default

`configs/default.py:tiny` is a network with one block per stage and four
filters that trains a handful of steps; tests and smoke runs use it.
"""

import ml_collections

from configs import common

VARIANTS = ('', 'tiny')


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """`arg`: '' (the default run) or 'tiny'."""
  if arg not in VARIANTS:
    raise ValueError(
        f'configs/default.py:{arg} is not a variant; accepted: '
        f'{", ".join(repr(v) for v in VARIANTS)}.')
  config = common.get_config()

  # Model.
  config.model = 'resnet20'

  # Input.
  config.dataset = 'digits'
  config.batch_size = 64
  config.eval_batch_size = 120  # 3 batches cover the 360 test images.

  # Optimizer and schedule: the CIFAR recipe, shortened to the small set.
  config.learning_rate = 0.1
  config.weight_decay = 5e-4
  config.schedule = 'cosine'
  config.warmup_epochs = 1.0
  config.num_epochs = 15.0

  # Logging, evaluation and checkpoints.
  config.log_every_steps = 50
  config.eval_every_steps = 110  # About every 5 epochs of 22 steps.

  if arg == 'tiny':
    config.stage_sizes = (1, 1, 1)
    config.num_filters = 4
    config.batch_size = 32
    # Warm-up and a piecewise decay at fixed steps: the rate at a step does
    # not depend on the run's length, so a run stopped early and resumed
    # with more steps follows the same path.
    config.schedule = 'piecewise'
    config.warmup_epochs = 0.0
    config.warmup_steps = 2
    config.boundaries_steps = (4,)
    config.num_train_steps = 6
    config.log_every_steps = 2
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 3
  return config
