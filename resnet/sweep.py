"""Ablation sweeps: a grid of training runs from one config, run, listed or
reported (the paper's Figure 6 and Tables 3 and 6 are sweeps).

A sweep file (`configs/sweeps/*.py`) defines `get_sweep()` returning a
`Sweep`: the base config spec (`configs/cifar10.py`, optionally with
`:arg`) and the runs, a list of override dicts built with `axis`,
`product`, `zipped` and `concat`. Every run is validated against the base
config before anything trains, becomes one `train.py` command line, and
gets its own workdir named from its overrides (`model=plain20,seed=0`).
"""

import dataclasses
import difflib
import hashlib
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Reserved override key: the config spec itself (`':resnet110'` keeps the
# base file and changes its argument), for variants that set several fields.
CONFIG_KEY = 'config'
# Seconds a stopped run gets to exit after SIGTERM before it is killed.
TERMINATE_GRACE_S = 30.0

Overrides = dict[str, Any]


# Vocabulary for writing runs: each returns a list of override dicts.


def axis(field: str, values: Sequence[Any]) -> list[Overrides]:
  """One run per value of `field`: axis('seed', [0, 1])."""
  return [{field: value} for value in values]


def _merge(dicts: Sequence[Mapping[str, Any]]) -> Overrides:
  merged = {}
  for d in dicts:
    for key, value in d.items():
      if key in merged and merged[key] != value:
        raise ValueError(
            f'field {key!r} is set twice, to {merged[key]!r} and {value!r}; '
            'combine parts that set different fields')
      merged[key] = value
  return merged


def _as_runs(part: Sequence[Mapping[str, Any]] | Mapping[str, Any]):
  return [dict(part)] if isinstance(part, Mapping) else [dict(d) for d in part]


def product(*parts) -> list[Overrides]:
  """Every combination of the parts (the last part varies fastest)."""
  runs = [{}]
  for part in parts:
    runs = [_merge([run, d]) for run in runs for d in _as_runs(part)]
  return runs


def zipped(*parts) -> list[Overrides]:
  """Parts of equal length merged run by run (paired values)."""
  lists = [_as_runs(part) for part in parts]
  if len({len(runs) for runs in lists}) > 1:
    raise ValueError(
        f'zipped parts have lengths {[len(runs) for runs in lists]}; '
        'accepted: parts of equal length')
  return [_merge(group) for group in zip(*lists)]


def concat(*parts) -> list[Overrides]:
  """The runs of each part, one after the other."""
  return [run for part in parts for run in _as_runs(part)]


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A base config and the overrides of each run.

  Attributes:
    config: config spec as train.py's --config takes it, relative to the
      repository root: 'configs/cifar10.py' or 'configs/cifar10.py:resnet56'.
    runs: one override dict per run; field names as in --config.FIELD.
    fixed: overrides shared by every run, left out of the run names.
  """
  config: str
  runs: Sequence[Mapping[str, Any]] = ({},)
  fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Run:
  """One validated training run of a sweep."""
  name: str
  overrides: Overrides  # The run's own overrides (what names it).
  config_spec: str
  config: ml_collections.ConfigDict  # Base config with all overrides.
  flags: tuple[str, ...]  # --config.FIELD=VALUE arguments for train.py.

  def argv(self, workdir: str) -> list[str]:
    """train.py's arguments for this run inside the sweep dir `workdir`."""
    return ['train.py', f'--config={self.config_spec}',
            f'--workdir={os.path.join(workdir, self.name)}', *self.flags]


# Naming.


def _name_text(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return '-'.join(_name_text(v) for v in value)
  if isinstance(value, float):
    return repr(value)
  return str(value)


def run_name(overrides: Mapping[str, Any]) -> str:
  """Workdir name of a run: `key=value` pairs in order, filesystem-safe."""
  parts = []
  for key, value in overrides.items():
    if key == CONFIG_KEY:
      path, _, arg = str(value).rpartition(':')
      stem = os.path.splitext(os.path.basename(path))[0]
      parts.append('-'.join(p for p in (stem, arg) if p))
    else:
      parts.append(f'{key}={_name_text(value)}')
  name = re.sub(r'[^A-Za-z0-9._,=+-]', '_', ','.join(parts)) or 'base'
  # A leading dot or dash would hide the directory or look like a flag.
  name = re.sub(r'^[.-]', '_', name)
  if len(name) > 120:
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    name = f'{name[:100]}-{digest}'
  return name


# Loading and validation.


def _import_file(path: str, prefix: str):
  module_name = f'_{prefix}_{hashlib.sha1(path.encode()).hexdigest()[:8]}'
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(path: str) -> Sweep:
  """Imports a sweep file and returns its `get_sweep()`."""
  if not os.path.isfile(path):
    raise ValueError(f'sweep file {path!r} does not exist')
  sweep = _import_file(os.path.abspath(path), 'sweep').get_sweep()
  if not isinstance(sweep, Sweep):
    raise ValueError(f'{path}: get_sweep() returned {type(sweep).__name__}; '
                     'accepted: a resnet.sweep.Sweep')
  return sweep


def _config_path(spec: str) -> tuple[str, list[str]]:
  # As config_flags: the text after the first colon is get_config's argument.
  path, *arg = spec.split(':', 1)
  return (path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)), arg


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The locked config train.py builds from `--config=spec`, no overrides."""
  path, arg = _config_path(spec)
  if not os.path.isfile(path):
    raise ValueError(f'config file {spec!r} not found (looked for {path})')
  config = _import_file(path, 'config').get_config(*arg)
  config.lock()
  return config


def _check_field(config, key: str, value: Any, where: str) -> None:
  """Sets config.key = value, or raises a ValueError saying what is wrong."""
  parent, *path = config, *key.split('.')
  for depth, part in enumerate(path):
    if not isinstance(parent, ml_collections.ConfigDict) or part not in parent:
      accepted = sorted(parent.keys()) if isinstance(
          parent, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, accepted, n=1)
      hint = f' (did you mean {close[0]!r}?)' if close else ''
      raise ValueError(
          f'{where}: unknown config field {key!r}{hint}; accepted fields: '
          f'{", ".join(accepted)}')
    if depth < len(path) - 1:
      parent = parent[part]
  current = parent[path[-1]]
  # ConfigDict lets True pass for an int; the command line would not.
  bad = (current is not None and
         isinstance(current, bool) != isinstance(value, bool))
  try:
    if not bad:
      parent[path[-1]] = value
  except TypeError:
    bad = True
  if bad:
    raise ValueError(
        f'{where}: field {key!r} = {value!r} is a {type(value).__name__}; '
        f'accepted: a {type(current).__name__} like the base value '
        f'{current!r}')


# Config fields that become `models.create` overrides; '', 0 and () keep
# the model's default, as in resnet.train.create_model (not imported here:
# it loads TensorFlow, seconds that `list` would pay).
MODEL_FIELDS = ('shortcut', 'version', 'preactivation', 'zero_init_residual',
                'num_filters', 'stage_sizes')


def _check_model(config, where: str) -> None:
  """Builds the run's network (no parameters) to check name and options."""
  if 'model' not in config:
    return
  # Imported here: jax and flax load only once a sweep is being checked.
  from resnet import models  # pylint: disable=g-import-not-at-top
  if config.model not in models.names():
    raise ValueError(f'{where}: unknown model {config.model!r}; accepted: '
                     f'{", ".join(models.names())}')
  options = {field: config[field] for field in MODEL_FIELDS
             if field in config and config[field] not in ('', 0, ())}
  try:
    models.create(config.model, num_classes=10, **options)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from e


def _flag_text(value: Any) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, list):
    value = tuple(value)
  return repr(value)


def _parse_like_train(spec: str, flag_args: Sequence[str]):
  """The config train.py gets from these arguments, via config_flags."""
  path, arg = _config_path(spec)
  argv = ['train.py', '--config=' + ':'.join([path, *arg]), *flag_args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      'config', flag_values=flag_values, sys_argv=argv, lock_config=True)
  flag_values(argv)
  return flag_values.config


def expand(sweep: Sweep, sweep_path: str) -> list[Run]:
  """Validates every run of `sweep` and returns them, before any trains."""
  runs, names = [], {}
  for index, own in enumerate(sweep.runs):
    own = dict(own)
    name = run_name(own)
    where = f'{sweep_path}: run {index} ({name})'
    if name in names:
      raise ValueError(f'{where}: same workdir name as run {names[name]}; '
                       'accepted: runs that differ in their overrides')
    names[name] = index
    overrides = {k: v for k, v in own.items() if k != CONFIG_KEY}
    spec = str(own.get(CONFIG_KEY, sweep.config))
    if spec.startswith(':'):
      spec = sweep.config.split(':', 1)[0] + spec
    try:
      config = load_config(spec)
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(f'{where}: config {spec!r} failed to load: {e}') from e
    # The run's own overrides first: they are what `list` readers look for.
    fields = {**overrides, **{k: v for k, v in sweep.fixed.items()
                              if k not in overrides}}
    for key, value in fields.items():
      _check_field(config, key, value, where)
    _check_model(config, where)

    # The command line must rebuild exactly this config, so that `list`
    # and `run` train the same thing.
    flag_args = tuple(f'--config.{k}={_flag_text(v)}'
                      for k, v in fields.items())
    try:
      parsed = _parse_like_train(spec, flag_args)
    except (flags.Error, ValueError, TypeError, KeyError) as e:
      raise ValueError(f'{where}: train.py would reject {flag_args}: {e}')
    if parsed.to_dict() != config.to_dict():
      raise ValueError(
          f'{where}: overrides {fields} do not survive the command line '
          f'{" ".join(flag_args)}; accepted: ints, floats, bools, strings '
          'and tuples of them')
    runs.append(Run(name, own, spec, config, flag_args))
  return runs


# Listing and running.


def _portable(workdir: str) -> str:
  # Commands run from the repository root: keep paths inside it relative.
  workdir = os.path.abspath(workdir)
  inside = os.path.commonpath([workdir, REPO_ROOT]) == REPO_ROOT
  return os.path.relpath(workdir, REPO_ROOT) if inside else workdir


def command_line(run: Run, workdir: str) -> str:
  """The shell command, run from the repository root, that trains `run`."""
  return shlex.join(['python', *run.argv(_portable(workdir))])


def is_done(run_dir: str) -> bool:
  return os.path.exists(os.path.join(run_dir, 'done.json'))


def child_env(parallel: int, cpus: int | None = None) -> dict[str, str]:
  """Environment for `parallel` trainers sharing this machine's cores.

  Each trainer otherwise sizes its XLA and TensorFlow thread pools to all
  cores, and N of them thrash; splitting the cores keeps every run busy.
  Variables the user already set are left alone.
  """
  env = dict(os.environ)
  if parallel <= 1:
    return env
  threads = max(1, (cpus or os.cpu_count() or 1) // parallel)
  env.setdefault('TF_NUM_INTRAOP_THREADS', str(threads))
  env.setdefault('TF_NUM_INTEROP_THREADS', str(threads))
  env.setdefault('OMP_NUM_THREADS', str(threads))
  xla_flags = env.get('XLA_FLAGS', '')
  if threads == 1 and 'xla_cpu_multi_thread_eigen' not in xla_flags:
    env['XLA_FLAGS'] = f'{xla_flags} --xla_cpu_multi_thread_eigen=false'
  return env


def _last_line(path: str) -> str:
  with open(path, errors='replace') as f:
    lines = [line.strip() for line in f if line.strip()]
  return lines[-1] if lines else '(empty log)'


def _raise_interrupt(signum, frame):
  del frame
  raise KeyboardInterrupt(f'signal {signum}')


def _start(run: Run, workdir: str, env: Mapping[str, str]):
  run_dir = os.path.join(workdir, run.name)
  os.makedirs(run_dir, exist_ok=True)
  verb = ('resuming' if os.path.isdir(os.path.join(run_dir, 'checkpoints'))
          else 'starting')
  logging.info('%s: %s', run.name, verb)
  log = open(os.path.join(run_dir, 'train.log'), 'a')
  log.write(f'# sweep: {verb} {time.strftime("%Y-%m-%d %H:%M:%S")}: '
            f'{shlex.join(run.argv(workdir))}\n')
  log.flush()
  # A session of its own keeps a terminal's Ctrl-C from reaching the run
  # half-way through a checkpoint; the launcher stops it instead.
  process = subprocess.Popen(
      [sys.executable, *run.argv(workdir)], cwd=REPO_ROOT, env=dict(env),
      stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
      start_new_session=True)
  return process, log


def _stop(live: Mapping[str, Any]) -> None:
  for process, _ in live.values():
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGTERM)
  deadline = time.monotonic() + TERMINATE_GRACE_S
  for name, (process, log) in live.items():
    try:
      process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
    log.write('# sweep: stopped\n')
    log.close()
    logging.info('%s: stopped; run the sweep again to resume it', name)


def run_all(runs: Sequence[Run], workdir: str, *, parallel: int = 1,
            env: Mapping[str, str] | None = None) -> list[str]:
  """Trains the runs not yet done, `parallel` at a time.

  A run is done when its workdir holds done.json; any other run is started
  again with the same workdir, so the trainer resumes it from its
  checkpoints. SIGINT and SIGTERM stop every live run before returning.

  Returns:
    The names of the runs that failed (non-zero exit or no done.json).
  """
  if parallel < 1:
    raise ValueError(f'parallel = {parallel}; accepted: 1 or more')
  workdir = os.path.abspath(workdir)
  pending = [r for r in runs if not is_done(os.path.join(workdir, r.name))]
  for run in runs:
    if run not in pending:
      logging.info('%s: done, skipped', run.name)
  env = child_env(parallel) if env is None else env
  live, failed = {}, []
  # Also SIGINT: a launcher started in the background has it ignored.
  previous = {s: signal.signal(s, _raise_interrupt)
              for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    while pending or live:
      while pending and len(live) < parallel:
        run = pending.pop(0)
        live[run.name] = _start(run, workdir, env)
      time.sleep(0.2)
      for name, (process, log) in list(live.items()):
        if process.poll() is None:
          continue
        del live[name]
        log.close()
        if process.returncode == 0 and is_done(os.path.join(workdir, name)):
          logging.info('%s: done', name)
        else:
          failed.append(name)
          log_path = os.path.join(workdir, name, 'train.log')
          logging.error('%s: failed (exit code %d): %s; see %s', name,
                        process.returncode, _last_line(log_path), log_path)
  finally:
    _stop(live)
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  return failed
