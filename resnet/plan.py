"""Checks a config before anything runs, and derives the run it describes.

Every check raises a ValueError naming the field, its value and what is
accepted, before any step is compiled.
"""

import dataclasses

from etils import epath
import jax
import ml_collections

from resnet import input_pipeline

HALF_PRECISION_DTYPES = ('bfloat16', 'float16')


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """The batch arithmetic and length of a run, derived from the config."""
  dataset_info: input_pipeline.DatasetInfo
  device_count: int
  local_device_count: int
  local_batch_size: int
  per_device_batch_size: int
  steps_per_epoch: int
  num_train_steps: int

  @property
  def num_epochs(self) -> float:
    return self.num_train_steps / self.steps_per_epoch


def batchnorm_groups(config: ml_collections.ConfigDict, device_count: int,
                     per_device_batch_size: int) -> list[list[int]] | None:
  """Device groups over which BatchNorm takes statistics; None: all.

  `bn_group_size` counts examples, so the statistics span the same number of
  examples whatever the number of devices.
  """
  if config.bn_group_size == 0:
    return None
  size = config.bn_group_size
  if (size < 0 or size % per_device_batch_size
      or config.batch_size % size):
    raise ValueError(
        f'config.bn_group_size={size} must be 0 (the global batch) or a '
        f'multiple of the per-device batch ({per_device_batch_size}) that '
        f'divides config.batch_size={config.batch_size}.')
  group = size // per_device_batch_size
  return [list(range(start, start + group))
          for start in range(0, device_count, group)]


def check_workdir(workdir: str) -> None:
  """Refuses a workdir that exists and is not a directory."""
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise ValueError(
        f'workdir={workdir!r} is an existing file; accepted: a directory '
        'or a path that does not exist yet.')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the fields that need neither the data set nor the model.

  Raises:
    ValueError: naming the field, its value and what is accepted.
  """
  positive = ('batch_size', 'log_every_steps', 'checkpoints_to_keep',
              'prefetch_size')
  non_negative = ('eval_batch_size', 'eval_every_steps',
                  'checkpoint_every_steps', 'num_train_steps', 'num_epochs')
  for field in positive:
    if config[field] <= 0:
      raise ValueError(
          f'config.{field}={config[field]} must be positive.')
  for field in non_negative:
    if config[field] < 0:
      raise ValueError(
          f'config.{field}={config[field]} must be zero or positive.')
  if config.num_train_steps == 0 and config.num_epochs <= 0:
    raise ValueError(
        f'config.num_epochs={config.num_epochs} must be positive when '
        'config.num_train_steps is 0 (the length comes from the epochs).')
  if config.half_precision_dtype not in HALF_PRECISION_DTYPES:
    raise ValueError(
        f'config.half_precision_dtype={config.half_precision_dtype!r} is '
        f'not supported; accepted: {", ".join(HALF_PRECISION_DTYPES)}.')
  devices = jax.device_count()
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % devices:
      raise ValueError(
          f'config.{field}={config[field]} is not divisible by the '
          f'{devices} devices; accepted: a multiple of {devices}.')


def plan_run(config: ml_collections.ConfigDict) -> RunPlan:
  """Validates `config` and derives the batch sizes and the run's length."""
  validate_config(config)
  info = input_pipeline.get_dataset_info(config)
  steps_per_epoch = info.num_train_examples // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(
        f'config.batch_size={config.batch_size} exceeds the '
        f'{info.num_train_examples} training examples of '
        f'{config.dataset!r}; accepted: at most that many.')
  num_train_steps = (config.num_train_steps or
                     max(int(config.num_epochs * steps_per_epoch), 1))
  return RunPlan(
      dataset_info=info, device_count=jax.device_count(),
      local_device_count=jax.local_device_count(),
      local_batch_size=config.batch_size // jax.process_count(),
      per_device_batch_size=config.batch_size // jax.device_count(),
      steps_per_epoch=steps_per_epoch, num_train_steps=num_train_steps)
