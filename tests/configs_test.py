"""Tests for configs/: every variant builds, validates and names its model."""

import pytest

from configs import cifar10
from configs import cifar100
from configs import default
from configs import imagenet
from configs import imagenet_pod
from resnet import optim
from resnet import plan
from resnet import train

# Training examples per data set, to derive steps per epoch offline.
TRAIN_EXAMPLES = {'digits': 1_437, 'cifar10': 50_000, 'cifar100': 50_000,
                  'imagenet2012': imagenet.TRAIN_EXAMPLES}

CONFIGS = [
    (default, ''), (default, 'tiny'),
    (cifar10, 'resnet20'), (cifar10, 'resnet110'), (cifar10, 'plain56'),
    (cifar100, 'resnet1202'),
    (imagenet, 'paper'), (imagenet, 'paper,resnet34'), (imagenet, 'modern'),
    (imagenet_pod, ''), (imagenet_pod, 'resnet101'),
]


@pytest.mark.parametrize('module, arg', CONFIGS)
def test_config_validates(module, arg):
  config = module.get_config(arg)
  plan.validate_config(config)
  model = train.create_model(config, num_classes=10)
  assert model.stage_sizes
  steps_per_epoch = TRAIN_EXAMPLES[config.dataset] // config.batch_size
  num_steps = (config.num_train_steps or
               int(config.num_epochs * steps_per_epoch))
  optim.create_optimizer(config)
  learning_rate_fn = optim.create_learning_rate_fn(
      config, steps_per_epoch, num_steps)
  assert float(learning_rate_fn(num_steps - 1)) < config.learning_rate


def test_cifar_is_the_papers_recipe():
  config = cifar10.get_config('resnet110')
  assert (config.batch_size, config.learning_rate, config.momentum,
          config.weight_decay) == (128, 0.1, 0.9, 1e-4)
  assert tuple(config.boundaries_steps) == (32_000, 48_000)
  assert config.num_train_steps == 64_000
  fn = optim.create_learning_rate_fn(config, 390, 64_000)
  assert [float(fn(s)) for s in (0, 400)] == pytest.approx([0.01, 0.1])
  assert cifar10.get_config('resnet56').warmup_steps == 0


def test_imagenet_recipes():
  paper = imagenet.get_config('paper')
  assert paper.model == 'resnet50' and paper.scale_augmentation
  assert tuple(paper.boundaries_epochs) == (30.0, 60.0)
  modern = imagenet.get_config('modern,resnet18')
  assert modern.model == 'resnet18' and modern.version == 'v1.5'
  assert modern.learning_rate == pytest.approx(0.1 * modern.batch_size / 256)
  pod = imagenet_pod.get_config('')
  assert pod.learning_rate == pytest.approx(1.6) and pod.bn_group_size == 256


@pytest.mark.parametrize('module, arg', [
    (default, 'huge'), (cifar10, 'resnet50'), (imagenet, 'fancy'),
    (imagenet, 'paper,resnet56'), (imagenet_pod, 'resnet20'),
])
def test_unknown_variant_lists_the_accepted_ones(module, arg):
  with pytest.raises(ValueError, match='accepted'):
    module.get_config(arg)


def test_batchnorm_groups_span_a_fixed_number_of_examples():
  config = imagenet_pod.get_config('')
  groups = plan.batchnorm_groups(config, device_count=128,
                                  per_device_batch_size=32)
  assert len(groups) == 16 and groups[1] == list(range(8, 16))
  with pytest.raises(ValueError, match='bn_group_size=256'):
    plan.batchnorm_groups(config, device_count=8,
                          per_device_batch_size=512)
