"""The modern ImageNet recipe on a TPU pod slice or a multi-GPU cluster.

configs/imagenet.py:modern at a global batch of 4,096: the learning rate
scales linearly (0.1 x 4096 / 256 = 1.6) after a 5-epoch warm-up (Goyal et
al. 2017), and BatchNorm takes its statistics over groups of 256 examples
whatever the number of devices, so the recipe behaves the same on 16 or
256 chips (it needs a per-device batch of at most 256, i.e. 16 devices or
more; on fewer, add --config.bn_group_size=0). Run the same command on
every host (README.md, "Many hosts"):

  python train.py --config=configs/imagenet_pod.py --workdir=gs://b/r50

`arg` picks the model, e.g. configs/imagenet_pod.py:resnet101.
"""

import ml_collections

from configs import imagenet


def get_config(arg: str = 'resnet50') -> ml_collections.ConfigDict:
  """`arg`: an ImageNet model name (default resnet50)."""
  _, model = imagenet.parse_arg(f'modern,{arg or "resnet50"}',
                                config_file='imagenet_pod')
  config = imagenet.get_config(f'modern,{model}')

  # Input: a large global batch, also for evaluation (padding is masked).
  config.batch_size = 4_096
  config.eval_batch_size = 4_096

  # BatchNorm: statistics over 256 examples, as on one 8-GPU machine.
  config.bn_group_size = 256

  # Schedule: linear scaling rule, warm-up as in the modern recipe.
  config.learning_rate = 0.1 * config.batch_size / 256
  steps_per_epoch = imagenet.TRAIN_EXAMPLES // config.batch_size
  config.log_every_steps = 50
  config.eval_every_steps = steps_per_epoch
  config.checkpoint_every_steps = steps_per_epoch
  return config
