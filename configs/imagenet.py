"""ImageNet (ILSVRC 2012): the paper's recipe and a modern one.

`paper` (the default) follows He et al. (2015, section 3.4): batch 256, SGD
with momentum 0.9, weight decay 1e-4, learning rate 0.1 divided by 10 at
epochs 30 and 60 of 90 (the paper divides "when the error plateaus" and
trains 60e4 iterations; fixed epochs are the usual reproduction), scale
augmentation (shorter side in [256, 480], 224x224 crops, flips), option B
shortcuts, v1 bottlenecks. Images are normalised per channel rather than by
the paper's per-pixel mean, which would need a pass over the 1.28M images.
The paper reports 22.85% top-1 error for ResNet-50 with 10-crop testing
(Table 3); evaluated on one centre crop, as here, reproductions reach about
76% top-1.

`modern` is the recipe most reproductions now use: v1.5 bottlenecks, the
last BatchNorm of each residual branch zero-initialised, 5 epochs of linear
warm-up then cosine decay, learning rate 0.1 x batch / 256, label smoothing
0.1, Nesterov momentum, bfloat16 compute; expect about 77% top-1 for
ResNet-50.

  python train.py --config=configs/imagenet.py --workdir=runs/r50
  python train.py --config=configs/imagenet.py:paper,resnet34 ...
  python train.py --config=configs/imagenet.py:modern --workdir=runs/r50m

Prepare the data first (README.md, "ImageNet").
"""

import ml_collections

from configs import common

RECIPES = ('paper', 'modern')
DEPTHS = (18, 34, 50, 101, 152, 200)
MODELS = tuple(f'{kind}{depth}' for kind in ('resnet', 'plain')
               for depth in DEPTHS)
# ImageNet: 1,281,167 training images.
TRAIN_EXAMPLES = 1_281_167


def parse_arg(arg: str, config_file: str = 'imagenet') -> tuple[str, str]:
  """'recipe[,model]' -> (recipe, model); both parts optional."""
  parts = arg.split(',') if arg else []
  recipe = parts[0] if parts and parts[0] else 'paper'
  model = parts[1] if len(parts) > 1 else 'resnet50'
  if len(parts) > 2 or recipe not in RECIPES or model not in MODELS:
    raise ValueError(
        f'configs/{config_file}.py:{arg} is not accepted; accepted: '
        f'RECIPE[,MODEL] with RECIPE in {", ".join(RECIPES)} and MODEL in '
        f'{", ".join(MODELS)}.')
  return recipe, model


def get_config(arg: str = 'paper') -> ml_collections.ConfigDict:
  """`arg`: 'paper' or 'modern', then optionally ',<model name>'."""
  recipe, model = parse_arg(arg)
  config = common.get_config()

  # Model: option B shortcuts and v1 are the models' ImageNet defaults.
  config.model = model

  # Input: per-channel normalisation is the 'imagenet' recipe's default.
  config.dataset = 'imagenet2012'
  config.batch_size = 256
  config.eval_batch_size = 1_024  # Divides by 8 or 16 devices.
  config.shuffle_buffer_size = 16 * 1024
  config.cache = False  # The training set does not fit in memory.

  # Optimizer.
  config.momentum = 0.9
  config.weight_decay = 1e-4

  # Schedule.
  config.learning_rate = 0.1
  config.num_epochs = 90.0

  # Logging, evaluation (every epoch) and checkpoints.
  steps_per_epoch = TRAIN_EXAMPLES // config.batch_size
  config.log_every_steps = 100
  config.eval_every_steps = steps_per_epoch
  config.checkpoint_every_steps = steps_per_epoch

  if recipe == 'paper':
    config.scale_augmentation = True
    config.schedule = 'piecewise'
    config.boundaries_epochs = (30.0, 60.0)
  else:
    config.version = 'v1.5'
    config.zero_init_residual = True
    config.half_precision = True
    config.half_precision_dtype = 'bfloat16'
    config.nesterov = True
    config.label_smoothing = 0.1
    config.batch_size = 1024
    # Linear scaling rule (Goyal et al. 2017): 0.1 per 256 examples.
    config.learning_rate = 0.1 * config.batch_size / 256
    config.schedule = 'cosine'
    config.warmup_epochs = 5.0
    config.warmup_learning_rate = 0.0
    steps_per_epoch = TRAIN_EXAMPLES // config.batch_size
    config.eval_every_steps = steps_per_epoch
    config.checkpoint_every_steps = steps_per_epoch
  return config
