"""Launches several local processes that act as the hosts of a pod.

Each process runs the same Python entry point with
`--coordinator_address=127.0.0.1:<free port> --num_processes=N
--process_id=i` appended, sees `devices_per_process` simulated CPU devices,
and writes its output to its own log file (pipes could fill up and block a
chatty process). Every wait has a deadline, so a hung collective fails the
test instead of stalling CI.
"""

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tests run tiny models for a few steps, so compile time dominates: these
# XLA flags cut it by about half on CPU at the cost of slower code. They
# change the rounding of some results slightly, so runs compared with each
# other must all use them.
FAST_COMPILE_XLA_FLAGS = ('--xla_backend_optimization_level=0 '
                          '--xla_llvm_disable_expensive_passes=true')

# How long the other processes may keep running after one has failed:
# survivors usually sit in a collective waiting for the dead peer, and jax's
# heartbeat takes 100 s to notice it. On a loaded machine a healthy process
# can take several seconds to exit after its peer did.
_GRACE_AFTER_FAILURE_S = 30.0


def free_port() -> int:
  """A TCP port on the loopback interface that nothing listens on now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class ProcessResult:
  """How one process ended: `returncode` is None if it was killed on timeout.

  A negative `returncode` -n means it died from signal n.
  """
  process_id: int
  returncode: int | None
  log_path: str

  @property
  def log(self) -> str:
    with open(self.log_path, errors='replace') as f:
      return f.read()


class Launch:
  """N running processes of one entry point, started by `start`."""

  def __init__(self, procs: list[subprocess.Popen], log_paths: list[str]):
    self.procs = procs
    self.log_paths = log_paths
    self.timed_out = False

  def send_signal(self, sig: int, process_ids=None) -> None:
    """Sends `sig` to the given processes (all by default) still running."""
    ids = range(len(self.procs)) if process_ids is None else process_ids
    for i in ids:
      if self.procs[i].poll() is None:
        self.procs[i].send_signal(sig)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)
    for p in self.procs:
      p.wait()

  def wait_for_output(self, text: str, timeout_s: float) -> int:
    """Waits until some process logs `text`; returns that process's id.

    Raises:
      TimeoutError: if no process logged it before the deadline or before
        all of them ended; the message holds their logs.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      for i, path in enumerate(self.log_paths):
        with open(path, errors='replace') as f:
          if text in f.read():
            return i
      if None not in [p.poll() for p in self.procs]:
        break
      time.sleep(0.1)
    results = [ProcessResult(i, p.poll(), path) for i, (p, path)
               in enumerate(zip(self.procs, self.log_paths))]
    raise TimeoutError(f'No process printed {text!r}.\n'
                       f'{describe(results)}')

  def wait(self, timeout_s: float,
           clean_exit_codes: tuple[int, ...] = (0,)) -> list[ProcessResult]:
    """Waits for all processes; kills every one left at the deadline.

    Once a process ends with a code outside `clean_exit_codes`, the others
    get only a short grace period instead of the full timeout.
    """
    deadline = time.monotonic() + timeout_s
    while None in [p.poll() for p in self.procs]:
      now = time.monotonic()
      failed = any(p.returncode not in (None, *clean_exit_codes)
                   for p in self.procs)
      if failed:
        deadline = min(deadline, now + _GRACE_AFTER_FAILURE_S)
      if now > deadline:
        self.timed_out = True
        break
      time.sleep(0.1)
    # Return codes are read before the kill, so a killed straggler reads as
    # None rather than -9.
    codes = [p.poll() for p in self.procs]
    self.kill()
    return [ProcessResult(i, code, path)
            for i, (code, path) in enumerate(zip(codes, self.log_paths))]


def start(args: list[str], *, num_processes: int, devices_per_process: int,
          log_dir: str, env: dict[str, str] | None = None) -> Launch:
  """Starts `python <args> <distributed flags>` once per process.

  Args:
    args: the entry point and its own arguments, e.g. ['train.py',
      '--config=configs/default.py:tiny'], run from the repository root.
    num_processes: how many processes (simulated hosts) to start.
    devices_per_process: simulated CPU devices in each process.
    log_dir: where `process_<i>.log` files go (created if missing).
    env: extra environment variables for every process.
  """
  os.makedirs(log_dir, exist_ok=True)
  coordinator = f'127.0.0.1:{free_port()}'
  child_env = dict(os.environ)
  child_env.update({
      'XLA_FLAGS': (
          f'--xla_force_host_platform_device_count={devices_per_process} '
          f'{FAST_COMPILE_XLA_FLAGS}'),
      'JAX_PLATFORMS': 'cpu',
      'CUDA_VISIBLE_DEVICES': '',
      'TF_CPP_MIN_LOG_LEVEL': '2',
      'PYTHONPATH': os.pathsep.join(
          filter(None, [REPO_ROOT, os.environ.get('PYTHONPATH')])),
      'PYTHONUNBUFFERED': '1',
  })
  child_env.update(env or {})
  procs, log_paths = [], []
  for i in range(num_processes):
    log_path = os.path.join(log_dir, f'process_{i}.log')
    flags = [f'--coordinator_address={coordinator}',
             f'--num_processes={num_processes}', f'--process_id={i}']
    with open(log_path, 'w') as log:
      procs.append(subprocess.Popen(
          [sys.executable, *args, *flags], cwd=REPO_ROOT, env=child_env,
          stdout=log, stderr=subprocess.STDOUT))
    log_paths.append(log_path)
  return Launch(procs, log_paths)


def run(args: list[str], *, num_processes: int, devices_per_process: int,
        log_dir: str, timeout_s: float, env: dict[str, str] | None = None,
        clean_exit_codes: tuple[int, ...] = (0,)) -> list[ProcessResult]:
  """`start` followed by `wait`: the results of a run to completion."""
  launch = start(args, num_processes=num_processes,
                 devices_per_process=devices_per_process, log_dir=log_dir,
                 env=env)
  return launch.wait(timeout_s, clean_exit_codes)


def describe(results: list[ProcessResult], tail_lines: int = 30) -> str:
  """Exit codes and the end of each log, for assertion messages."""
  parts = []
  for r in results:
    tail = '\n'.join(r.log.splitlines()[-tail_lines:])
    parts.append(f'--- process {r.process_id}: returncode {r.returncode}\n'
                 f'{tail}')
  return '\n'.join(parts)
