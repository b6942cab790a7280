"""The paper's CIFAR-10 recipe (He et al. 2015, section 4.2), any depth.

Batch 128, SGD with momentum 0.9, weight decay 1e-4 on the conv and dense
weights, learning rate 0.1 divided by 10 at 32k and 48k iterations, stop at
64k; 4-pixel padding, random 32x32 crops and flips, per-pixel mean
subtracted; option A (zero-padding) shortcuts. ResNet-110 and -1202 first
train at 0.01 for 400 iterations, as the paper does. The paper reports test
error 8.75% (ResNet-20), 6.97% (56), 6.43% (110), 7.93% (1202).

  python train.py --config=configs/cifar10.py:resnet56 --workdir=runs/r56
  python train.py --config=configs/cifar10.py:plain56 --workdir=runs/p56

The paper trains on 45k images and validates on 5k for its Figure 6 curves:
add --config.validation_holdout=5000.
"""

import ml_collections

from configs import common

DEPTHS = (20, 32, 44, 56, 110, 1202)
MODELS = tuple(f'{kind}{depth}' for kind in ('resnet', 'plain')
               for depth in DEPTHS)
# The paper warms up its deepest nets; 0.1 is "slightly too large to start
# converging" for them.
WARMUP_MODELS = ('resnet110', 'resnet1202', 'plain110', 'plain1202')


def get_config(arg: str = 'resnet20',
               dataset: str = 'cifar10') -> ml_collections.ConfigDict:
  """`arg`: a CIFAR model name, e.g. 'resnet56' or 'plain20'."""
  model = arg or 'resnet20'
  if model not in MODELS:
    raise ValueError(
        f'configs/{dataset}.py:{arg} is not a CIFAR model; accepted: '
        f'{", ".join(MODELS)}.')
  config = common.get_config()

  # Model: option A shortcuts are the models' CIFAR default.
  config.model = model

  # Input: the paper's augmentation is the 'cifar' recipe.
  config.dataset = dataset
  config.normalization = 'per_pixel_mean'
  config.batch_size = 128
  config.eval_batch_size = 512  # The last batch is padded and masked.

  # Optimizer.
  config.momentum = 0.9
  config.weight_decay = 1e-4

  # Schedule: absolute iteration numbers, warm-up included.
  config.learning_rate = 0.1
  config.schedule = 'piecewise'
  config.boundaries_steps = (32_000, 48_000)
  config.num_train_steps = 64_000
  if model in WARMUP_MODELS:
    config.warmup_mode = 'constant'
    config.warmup_learning_rate = 0.01
    config.warmup_steps = 400

  # Logging, evaluation and checkpoints.
  config.log_every_steps = 100
  config.eval_every_steps = 2_000
  config.checkpoint_every_steps = 2_000
  return config


def sweep() -> list[str]:
  """The paper's CIFAR-10 comparison (Figure 6, Table 6) as config args."""
  return [f'configs/cifar10.py:{model}' for model in MODELS
          if model != 'plain1202']
