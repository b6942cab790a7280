"""Multi-host start-up and preemption handling shared by all processes.

A pod job runs this code once per host. `initialize` joins the processes into
one JAX system, and `PreemptionWatcher` turns a SIGTERM seen by any process
into one step at which every process stops, saves and exits with
`PREEMPTED_EXIT_CODE`.
"""

import signal
import types

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

# The exit status of a run that stopped on a preemption notice after saving a
# checkpoint: the job is healthy and should be started again with the same
# command, which resumes from that checkpoint. Distinct from 0 (finished),
# 1 (a Python error) and 128 + n (killed by signal n).
PREEMPTED_EXIT_CODE = 42


class Preempted(Exception):
  """Raised once all processes have stopped and saved at `step`."""

  def __init__(self, step: int, checkpoint_dir: str):
    super().__init__(
        f'Preempted at step {step}; checkpoint saved in {checkpoint_dir}. '
        f'Run the same command again to resume (exit status '
        f'{PREEMPTED_EXIT_CODE} means "restart me").')
    self.step = step
    self.checkpoint_dir = checkpoint_dir


def detected_cluster() -> str | None:
  """Names the cluster jax.distributed would bootstrap from, if any.

  Calling `jax.distributed.initialize()` without arguments on a plain machine
  fails (no coordinator address), so we only do so where one of jax's cluster
  detectors (Cloud TPU VM or GKE TPU slice, SLURM, Open MPI, Kubernetes)
  recognises its environment. The opt-in detectors (mpi4py) only say whether
  a package is installed, so they are skipped as jax skips them.
  """
  # NOTE: jax has no public API for this; `ClusterEnv._cluster_types` is the
  # list jax.distributed.initialize itself walks (jax 0.10.2).
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=W0212
    if not env.opt_in_only_method and env.is_env_present():
      return env.name or env.__name__
  return None


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins this process to the multi-host job; must run before any JAX call.

  Args:
    coordinator_address: 'host:port' of process 0, which hosts the
      coordination service. Together with the next two arguments it selects
      an explicit launch (e.g. several processes on one machine); all three
      are given or none.
    num_processes: the number of processes in the job.
    process_id: this process's index in [0, num_processes).

  Returns:
    True if jax.distributed was initialised (explicitly or from a detected
    cluster), False for a plain single-process run.
  """
  explicit = {'coordinator_address': coordinator_address or None,
              'num_processes': num_processes, 'process_id': process_id}
  given = [name for name, value in explicit.items() if value is not None]
  if given and len(given) != len(explicit):
    missing = sorted(set(explicit) - set(given))
    raise ValueError(
        f'Got {", ".join(f"{n}={explicit[n]!r}" for n in given)} but not '
        f'{", ".join(missing)}: an explicit multi-process launch needs '
        'coordinator_address, num_processes and process_id together.')
  if given:
    if num_processes < 1:
      raise ValueError(
          f'num_processes={num_processes}; it must be a positive integer.')
    if not 0 <= process_id < num_processes:
      raise ValueError(
          f'process_id={process_id}; it must lie in [0, num_processes) = '
          f'[0, {num_processes}).')
    if ':' not in coordinator_address:
      raise ValueError(
          f'coordinator_address={coordinator_address!r}; expected '
          "'host:port', e.g. '127.0.0.1:12345'.")

  cluster = None if given else detected_cluster()
  if not given and cluster is None:
    logging.info('No multi-host cluster detected and no coordinator given: '
                 'running as a single process.')
    return False

  # Cross-process psum on the CPU backend (our tests, CPU clusters) needs a
  # CPU collectives implementation; gloo runs over TCP with nothing to
  # install. GPU and TPU backends ignore this option. 'gloo' is already the
  # default in jax 0.10.2 but was not in earlier releases.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if given:
    logging.info('Initialising jax.distributed: process %d of %d, '
                 'coordinator %s.', process_id, num_processes,
                 coordinator_address)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  else:
    logging.info('Initialising jax.distributed from the %s environment.',
                 cluster)
    jax.distributed.initialize()
  logging.info('Process %d of %d; %d local and %d global devices.',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on at least one of them.

  A collective (all processes must call it at the same point of the
  program); it waits for the devices to finish queued work, so call it
  every few steps, not every step.
  """
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
  return bool(np.any(flags))


class PreemptionWatcher:
  """Agrees across processes on the step at which to stop for preemption.

  The SIGTERM handler only sets a flag (a handler runs between two Python
  bytecodes, so it must not save or exit itself). `should_stop(step)` is
  called by every process after every step; every `check_every_steps`
  steps it combines the flags of all processes with `any_process`, so all
  of them return True at the same step and the fast path between checks
  costs one integer comparison.

  NOTE: jax.distributed.initialize installs its own C++ SIGTERM notifier
  for `multihost_utils.reached_preemption_sync_point` (orbax's
  `CheckpointManager.reached_preemption` wraps it). That protocol needs a
  call every step, agrees on a step only after a background round trip
  through the coordination service (tens of steps later in our CPU tests,
  so a short run can end first), and does nothing in a single-process run.
  Our Python handler, installed after initialize, replaces that notifier
  (the last handler installed for a signal wins), which gives one
  mechanism, exercised by the same tests, for one and many processes.
  """

  def __init__(self, check_every_steps: int):
    if check_every_steps < 1:
      raise ValueError(
          f'check_every_steps={check_every_steps}; it must be >= 1.')
    self.check_every_steps = check_every_steps
    self.signal_received = False
    self._previous_handler = None

  def __enter__(self) -> 'PreemptionWatcher':
    self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc_info) -> None:
    signal.signal(signal.SIGTERM, self._previous_handler or signal.SIG_DFL)
    self._previous_handler = None

  def _on_sigterm(self, signum: int, frame: types.FrameType | None) -> None:
    del signum, frame  # Unused; the flag is all the loop needs.
    self.signal_received = True

  def should_stop(self, step: int) -> bool:
    """Returns the same answer on every process; collective at check steps."""
    if step % self.check_every_steps:
      return False
    stop = any_process(self.signal_received)
    if stop:
      logging.warning(
          'Preemption notice (SIGTERM) received by %s; all %d processes '
          'stop at step %d.',
          'this process' if self.signal_received else 'another process',
          jax.process_count(), step)
    return stop
