"""Exposes a CPU host's cores as pmap devices, which trains faster there.

XLA's CPU backend offers one device by default and runs each convolution on
a shared pool of threads; the pmapped train step split over one host device
per core ran faster on 2 cores (docs/throughput_section.md has the figures).
The launchers call `configure` before JAX creates its backends. On a GPU or
TPU host the setting only shapes the CPU platform, which training leaves
alone.

Set RESNET_HOST_DEVICES=1 to keep the single CPU device, or to another
count; an explicit --xla_force_host_platform_device_count in XLA_FLAGS wins
over both.
"""

import os
from collections.abc import Sequence

import jax

ENV = 'RESNET_HOST_DEVICES'
_XLA_FLAG = '--xla_force_host_platform_device_count'


def cpu_cores() -> int:
  """The cores this process may run on (its affinity, not the machine's)."""
  return len(os.sched_getaffinity(0))


def requested_count() -> int | None:
  """The count set by RESNET_HOST_DEVICES, or None when it is unset.

  Raises:
    ValueError: when the variable is not a positive integer.
  """
  text = os.environ.get(ENV, '').strip()
  if not text:
    return None
  if not text.isdigit() or int(text) < 1:
    raise ValueError(
        f'{ENV}={text!r} is not accepted; accepted: a positive integer '
        '(1 keeps the single CPU device) or unset (one device per core).')
  return int(text)


def default_count(batch_sizes: Sequence[int] = ()) -> int:
  """RESNET_HOST_DEVICES, else the most devices, up to one per core, that
  divide every positive batch size in `batch_sizes`."""
  requested = requested_count()
  if requested is not None:
    return requested
  count = cpu_cores()
  # NOTE: measured on 2 cores only; a many-core host may prefer fewer
  # devices with larger per-device batches (benchmark.py --devices=1,2,4).
  while count > 1 and any(size % count for size in batch_sizes if size > 0):
    count -= 1
  return count


def forced_by_xla_flags() -> bool:
  return _XLA_FLAG in os.environ.get('XLA_FLAGS', '')


def configure(count: int) -> int:
  """Asks JAX for `count` CPU devices unless XLA_FLAGS already sets them.

  Must run before the first JAX computation or device query. Returns the
  count in force (XLA_FLAGS' when it is set there).

  Raises:
    ValueError: for a count below 1.
    RuntimeError: from JAX, when its backends are already initialised.
  """
  if count < 1:
    raise ValueError(f'host device count={count}; accepted: 1 or more.')
  if forced_by_xla_flags():
    flags = os.environ['XLA_FLAGS'].split()
    value = [f for f in flags if f.startswith(_XLA_FLAG)][-1]
    return int(value.partition('=')[2])
  jax.config.update('jax_num_cpu_devices', count)
  return count
