"""Measures training throughput: a thin launcher over resnet.benchmark.

  python benchmark.py --config=configs/imagenet.py \
      --config.model=resnet18 --config.batch_size=32 --mode=step --json
  python benchmark.py --config=configs/cifar10.py --mode=step --devices=1,2
  python benchmark.py --config=configs/default.py --mode=input \
      --input_datasets=digits,cifar10
  python benchmark.py --config=configs/default.py --mode=loop

`--mode=step` times the pmapped train step on synthetic batches already on
the devices; `input` the tf.data stream alone; `loop` both together, as
training runs them. Prints a table, or one JSON object with --json. On a CPU
host the cores become pmap devices (resnet/host_devices.py); --devices=1,2
runs one process per count and compares them. Set the count with --devices
or RESNET_HOST_DEVICES.
"""

import json
import subprocess
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from resnet import benchmark
from resnet import host_devices

config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with :variant.',
    lock_config=True)
_MODE = flags.DEFINE_enum('mode', 'step', ['step', 'input', 'loop'],
                          'What to measure.')
_JSON = flags.DEFINE_bool('json', False,
                          'Print one JSON object instead of a table.')
_JSON_OUT = flags.DEFINE_string('json_out', '',
                                'Also write the JSON object to this file.')
_NUM_STEPS = flags.DEFINE_integer(
    'num_steps', 20, 'Timed steps (batches in --mode=input).')
_WARMUP_STEPS = flags.DEFINE_integer(
    'warmup_steps', 3, 'Untimed steps (batches) run first.')
_PEAK_FLOPS = flags.DEFINE_float(
    'peak_flops', 0.0, 'Peak FLOP/s of all devices used; 0 measures it by '
    'a matmul in the compute dtype on the same devices.')
_IMAGE_SIZE = flags.DEFINE_integer(
    'image_size', 0, 'Image side for --mode=step; 0: the config\'s, else '
    'the data set\'s.')
_DEVICES = flags.DEFINE_list(
    'devices', [], 'Devices to pmap over: one count, or several to compare '
    '(one process each). Default: all local devices; on a CPU host, one per '
    'core ($RESNET_HOST_DEVICES overrides).')
_INPUT_DATASETS = flags.DEFINE_list(
    'input_datasets', [], '--mode=input: data sets to measure, each with its '
    'recipe\'s defaults; default: the config\'s.')
_MOCK_EXAMPLES = flags.DEFINE_integer(
    'mock_examples', 1024, 'Examples of TFDS mock data standing in for a data '
    'set that is not prepared (labelled mock); 0: fail instead.')
flags.mark_flags_as_required(['config'])

STEP_COLUMNS = ('model', 'dtype', 'batch', 'image_size', 'devices',
                'images_per_sec', 'step_time_ms', 'step_time_q1_ms',
                'step_time_q3_ms', 'compile_time_s', 'flops_per_image',
                'achieved_flops', 'peak_flops', 'fraction_of_peak')
INPUT_COLUMNS = ('dataset', 'recipe', 'mock', 'image_size', 'batch',
                 'images_per_sec', 'batch_time_ms', 'first_batch_s')
LOOP_COLUMNS = ('model', 'dataset', 'mock', 'batch', 'devices',
                'images_per_sec', 'step_time_ms', 'input_wait_fraction',
                'compile_time_s', 'achieved_flops')


def compare_devices(counts: list[str]) -> list[dict]:
  """Reruns this command once per device count; their JSON results."""
  results = []
  args = [a for a in sys.argv[1:] if not a.startswith(('--devices', '--json'))]
  for count in counts:
    command = [sys.executable, sys.argv[0], *args, f'--devices={count}',
               '--json']
    logging.info('Running %s', ' '.join(command))
    output = subprocess.run(command, check=True, capture_output=True,
                            text=True).stdout
    results.append(json.loads(output.strip().splitlines()[-1]))
  return results


def run(config, num_devices: int) -> tuple[list[dict], tuple[str, ...]]:
  """The results of --mode on the first `num_devices` local devices."""
  devices = jax.local_devices()[:num_devices]
  kwargs = dict(num_steps=_NUM_STEPS.value, warmup_steps=_WARMUP_STEPS.value)
  if _MODE.value == 'step':
    return [benchmark.benchmark_step(
        config, devices=devices, image_size=_IMAGE_SIZE.value,
        peak_flops=_PEAK_FLOPS.value, **kwargs)], STEP_COLUMNS
  if _IMAGE_SIZE.value:
    config.image_size = _IMAGE_SIZE.value
  if _MODE.value == 'loop':
    context, mock = benchmark.data_context(config, _MOCK_EXAMPLES.value)
    with context:
      result = benchmark.benchmark_loop(config, devices=devices,
                                        peak_flops=_PEAK_FLOPS.value, **kwargs)
    return [{**result, 'mock': mock}], LOOP_COLUMNS

  results = []
  for name in _INPUT_DATASETS.value or [config.dataset]:
    dataset_config = config.copy_and_resolve_references()
    if name != config.dataset:
      # Another data set gets its own recipe's defaults.
      dataset_config.update(dataset=name, recipe='', image_size=0,
                            normalization='')
    context, mock = benchmark.data_context(dataset_config,
                                           _MOCK_EXAMPLES.value)
    with context:
      result = benchmark.benchmark_input(
          dataset_config, num_devices=num_devices,
          num_batches=_NUM_STEPS.value, warmup_batches=_WARMUP_STEPS.value)
    results.append({**result, 'mock': mock})
  return results, INPUT_COLUMNS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  if len(_DEVICES.value) > 1:
    results = compare_devices(_DEVICES.value)
    columns = STEP_COLUMNS if _MODE.value == 'step' else LOOP_COLUMNS
    output = {'mode': _MODE.value, 'runs': results}
  else:
    count = (int(_DEVICES.value[0]) if _DEVICES.value else
             host_devices.default_count(
                 [config.batch_size, config.eval_batch_size]))
    host_devices.configure(count)
    # tf.data only feeds the host; keep TensorFlow off the accelerators.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
    count = min(count, jax.local_device_count())
    logging.info('Benchmarking on %d of %s', count, jax.local_devices())
    results, columns = run(config, count)
    output = results[0] if len(results) == 1 else {
        'mode': _MODE.value, 'runs': results}

  text = json.dumps(output)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, 'w') as f:
      f.write(text + '\n')
  print(text if _JSON.value else benchmark.format_table(results, columns))


if __name__ == '__main__':
  app.run(main)
