"""Tests of ablation sweeps: naming, expansion, validation, report, and the
`run` / `list` / `report` commands end to end on the tiny config."""

import concurrent.futures
import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from resnet import models
from resnet import sweep as sweep_lib
from resnet import sweep_report

REPO = sweep_lib.REPO_ROOT
TINY_SWEEP = os.path.join(REPO, 'configs', 'sweeps', 'tiny.py')
# Metrics that measure the machine, not the training.
TIMING = re.compile(r'per_sec|time|eta|wait')

FIXTURE_CONFIG = '''
"""A small stand-in config for validation tests."""
import ml_collections


def get_config(arg=''):
  config = ml_collections.ConfigDict()
  config.model = arg or 'resnet20'
  config.seed = 0
  config.learning_rate = 0.1
  config.stage_sizes = ()
  config.half_precision = False
  config.dataset = 'digits'
  config.optimizer = ml_collections.ConfigDict({'momentum': 0.9})
  return config
'''


def write_sweep(tmp_path, runs: str, config=None, name='s.py'):
  """Writes a sweep file over the fixture config (or `config`)."""
  if config is None:
    config = str(tmp_path / 'fixture.py')
    (tmp_path / 'fixture.py').write_text(FIXTURE_CONFIG)
  path = tmp_path / name
  path.write_text(
      'from resnet.sweep import Sweep, axis, product, zipped, concat\n\n'
      f'def get_sweep():\n  return Sweep(config={config!r}, runs={runs})\n')
  return str(path)


class TestVocabulary:

  def test_product_varies_last_part_fastest(self):
    runs = sweep_lib.product(sweep_lib.axis('model', ['plain20', 'resnet20']),
                             sweep_lib.axis('seed', [0, 1]))
    assert runs == [{'model': 'plain20', 'seed': 0},
                    {'model': 'plain20', 'seed': 1},
                    {'model': 'resnet20', 'seed': 0},
                    {'model': 'resnet20', 'seed': 1}]

  def test_product_with_fixed_dict(self):
    runs = sweep_lib.product(sweep_lib.axis('seed', [0, 1]), {'lr': 0.1})
    assert runs == [{'seed': 0, 'lr': 0.1}, {'seed': 1, 'lr': 0.1}]

  def test_zipped_pairs_values(self):
    runs = sweep_lib.zipped(sweep_lib.axis('model', ['resnet20', 'resnet110']),
                            sweep_lib.axis('warmup_steps', [0, 400]))
    assert runs == [{'model': 'resnet20', 'warmup_steps': 0},
                    {'model': 'resnet110', 'warmup_steps': 400}]

  def test_zipped_rejects_unequal_lengths(self):
    with pytest.raises(ValueError, match=r'lengths \[2, 1\]'):
      sweep_lib.zipped(sweep_lib.axis('a', [1, 2]), sweep_lib.axis('b', [1]))

  def test_concat_and_conflicting_fields(self):
    runs = sweep_lib.concat(sweep_lib.axis('a', [1]), [{'b': 2}])
    assert runs == [{'a': 1}, {'b': 2}]
    with pytest.raises(ValueError, match="field 'a' is set twice"):
      sweep_lib.product(sweep_lib.axis('a', [1]), sweep_lib.axis('a', [2]))


class TestNaming:

  def test_keys_in_order(self):
    assert (sweep_lib.run_name({'model': 'plain20', 'seed': 0}) ==
            'model=plain20,seed=0')

  def test_values_are_filesystem_safe(self):
    assert sweep_lib.run_name({'stage_sizes': (1, 2), 'lr': 1e-3,
                               'data_dir': '/d/x y'}) == (
                                   'stage_sizes=1-2,lr=0.001,'
                                   'data_dir=_d_x_y')
    assert sweep_lib.run_name({}) == 'base'
    assert sweep_lib.run_name({'config': ':resnet110'}) == 'resnet110'
    assert (sweep_lib.run_name({'config': 'configs/cifar10.py:plain56'}) ==
            'cifar10-plain56')
    assert sweep_lib.run_name({'config': '..'}) == '_.'

  def test_long_names_are_shortened_deterministically(self):
    overrides = {f'field{i}': 'value' * 3 for i in range(10)}
    name = sweep_lib.run_name(overrides)
    assert len(name) <= 120 and name == sweep_lib.run_name(overrides)
    overrides['field9'] = 'other'
    assert sweep_lib.run_name(overrides) != name


class TestValidation:

  def test_expands_into_command_lines(self, tmp_path):
    path = write_sweep(tmp_path, "product(axis('seed', [0, 1]), "
                       "{'stage_sizes': (1, 1, 1), 'learning_rate': 1})")
    runs = sweep_lib.expand(sweep_lib.load_sweep(path), path)
    assert [r.name for r in runs] == [
        'seed=0,stage_sizes=1-1-1,learning_rate=1',
        'seed=1,stage_sizes=1-1-1,learning_rate=1']
    assert runs[1].config.seed == 1
    assert runs[1].config.learning_rate == 1.0
    argv = shlex.split(sweep_lib.command_line(runs[1], '/tmp/sw'))
    assert argv[:4] == ['python', 'train.py',
                        f'--config={tmp_path / "fixture.py"}',
                        '--workdir=/tmp/sw/' + runs[1].name]
    assert argv[4:] == ['--config.seed=1', '--config.stage_sizes=(1, 1, 1)',
                        '--config.learning_rate=1']

  def test_config_arg_and_nested_field(self, tmp_path):
    path = write_sweep(tmp_path, "product(axis('config', [':plain20']), "
                       "{'optimizer.momentum': 0.5})")
    (run,) = sweep_lib.expand(sweep_lib.load_sweep(path), path)
    assert run.name == 'plain20,optimizer.momentum=0.5'
    assert run.config.model == 'plain20'
    assert run.config_spec.endswith('fixture.py:plain20')

  def test_misspelt_field_names_sweep_run_and_field(self, tmp_path):
    path = write_sweep(tmp_path, "axis('sed', [0])")
    with pytest.raises(ValueError) as e:
      sweep_lib.expand(sweep_lib.load_sweep(path), path)
    message = str(e.value)
    assert path in message and 'run 0 (sed=0)' in message
    assert "'sed'" in message and "did you mean 'seed'" in message
    assert 'accepted fields: dataset, half_precision' in message

  def test_misspelt_nested_field(self, tmp_path):
    path = write_sweep(tmp_path, "axis('optimizer.momentun', [0.5])")
    with pytest.raises(ValueError, match="did you mean 'momentum'"):
      sweep_lib.expand(sweep_lib.load_sweep(path), path)

  @pytest.mark.parametrize('runs, message', [
      ("axis('seed', ['0'])", "'seed' = '0' is a str; accepted: a int"),
      ("axis('half_precision', [1])", "accepted: a bool"),
      ("axis('seed', [True])", "accepted: a int"),
      ("axis('learning_rate', ['0.1'])", "accepted: a float"),
  ])
  def test_wrong_type(self, tmp_path, runs, message):
    path = write_sweep(tmp_path, runs)
    with pytest.raises(ValueError, match=re.escape(message)):
      sweep_lib.expand(sweep_lib.load_sweep(path), path)

  def test_duplicate_runs_rejected(self, tmp_path):
    path = write_sweep(tmp_path, "axis('seed', [0, 0])")
    with pytest.raises(ValueError, match='same workdir name as run 0'):
      sweep_lib.expand(sweep_lib.load_sweep(path), path)

  def test_value_that_the_command_line_cannot_carry(self, tmp_path):
    # A string field set to None would reach train.py as the text 'None'.
    path = write_sweep(tmp_path, "axis('dataset', [None])")
    with pytest.raises(ValueError, match='do not survive the command line'):
      sweep_lib.expand(sweep_lib.load_sweep(path), path)

  def test_model_options_are_checked(self, tmp_path):
    # Plain nets have no shortcut to choose.
    path = write_sweep(tmp_path, "product(axis('model', ['plain20']), "
                       "axis('shortcut', ['B']))", config='configs/default.py')
    with pytest.raises(ValueError, match=r'run 0 \(model=plain20,shortcut=B'
                       r'\): .*shortcut'):
      sweep_lib.expand(sweep_lib.load_sweep(path), path)

  def test_unknown_model_lists_the_zoo(self, tmp_path):
    path = write_sweep(tmp_path, "axis('model', ['resnet20', 'resnet21'])")
    with pytest.raises(ValueError) as e:
      sweep_lib.expand(sweep_lib.load_sweep(path), path)
    assert "run 1 (model=resnet21): unknown model 'resnet21'" in str(e.value)
    assert ', '.join(models.names()) in str(e.value)


@pytest.mark.parametrize('name, num_runs', [
    ('degradation_cifar10', 10), ('shortcuts_imagenet', 4),
    ('degradation_digits', 4), ('tiny', 2)])
def test_shipped_sweeps_validate(name, num_runs):
  path = os.path.join(REPO, 'configs', 'sweeps', f'{name}.py')
  runs = sweep_lib.expand(sweep_lib.load_sweep(path), path)
  assert len(runs) == num_runs
  if name == 'degradation_cifar10':
    assert runs[-1].name == 'resnet110'
    assert runs[-1].config.warmup_steps == 400  # The paper's warm-up.
  if name == 'shortcuts_imagenet':
    assert [r.config.shortcut for r in runs] == ['', 'A', 'B', 'C']
    assert {r.config.model for r in runs} == {'plain34', 'resnet34'}


def test_child_env_splits_the_cores(monkeypatch):
  monkeypatch.delenv('TF_NUM_INTRAOP_THREADS', raising=False)
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  env = sweep_lib.child_env(2, cpus=2)
  assert env['TF_NUM_INTRAOP_THREADS'] == '1'
  assert env['XLA_FLAGS'] == ('--xla_force_host_platform_device_count=4 '
                              '--xla_cpu_multi_thread_eigen=false')
  assert sweep_lib.child_env(1, cpus=2) == dict(os.environ)


class TestReport:

  def _runs(self, tmp_path):
    path = write_sweep(tmp_path, "axis('config', [':plain20', ':resnet20', "
                       "':resnet32'])")
    return sweep_lib.expand(sweep_lib.load_sweep(path), path)

  def test_read_metrics_merges_resumed_steps(self, tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text(
        '{"step": 10, "train/accuracy": 0.5}\n'
        '{"step": 10, "eval/accuracy": 0.4}\n'
        '{"step": 20, "train/accuracy": 0.6}\n'
        # Resumed from the step-10 checkpoint: step 20 is written again.
        '{"step": 20, "train/accuracy": 0.7}\n'
        '{"step": 30, "train/acc')
    assert sweep_report.read_metrics(str(path)) == {
        10: {'step': 10, 'train/accuracy': 0.5, 'eval/accuracy': 0.4},
        20: {'step': 20, 'train/accuracy': 0.7}}

  def test_report_table_and_figure(self, tmp_path, monkeypatch):
    # Counting needs the real configs; the end-to-end test counts them.
    monkeypatch.setattr(sweep_report, 'count_params', lambda config: 68050)
    runs = self._runs(tmp_path)
    workdir = tmp_path / 'sweep'
    done_dir = workdir / 'plain20'
    done_dir.mkdir(parents=True)
    (done_dir / 'metrics.jsonl').write_text('\n'.join(json.dumps(r) for r in [
        {'step': 100, 'train/accuracy': 0.75, 'steps_per_sec': 3.0},
        {'step': 100, 'eval/accuracy': 0.70},
        {'step': 200, 'train/accuracy': 0.9},
        {'step': 200, 'eval/accuracy': 0.8},
        {'step': 300, 'train/accuracy': 0.95},
        {'step': 300, 'eval/accuracy': 0.78}]) + '\n')
    (done_dir / 'done.json').write_text(json.dumps(
        {'step': 300, 'wall_time_s': 61.5, 'eval/accuracy': 0.78}))
    partial_dir = workdir / 'resnet20'
    partial_dir.mkdir()
    (partial_dir / 'metrics.jsonl').write_text(
        '{"step": 100, "train/accuracy": 0.8}\n')
    (workdir / 'resnet32').mkdir()

    results = sweep_report.write_report(runs, str(workdir), 'Test sweep')
    assert [r.status for r in results] == ['done', 'partial', 'no metrics']
    assert sweep_report.summarize(
        runs[2], str(tmp_path / 'elsewhere')).status == 'not started'
    with open(workdir / 'report.csv') as f:
      rows = list(csv.DictReader(f))
    assert [r['run'] for r in rows] == ['plain20', 'resnet20', 'resnet32']
    assert rows[0]['status'] == 'done' and rows[0]['steps'] == '300'
    assert float(rows[0]['final_train_error_pct']) == pytest.approx(5.0)
    assert float(rows[0]['final_test_error_pct']) == pytest.approx(22.0)
    assert float(rows[0]['best_test_error_pct']) == pytest.approx(20.0)
    assert float(rows[0]['wall_time_s']) == pytest.approx(62, abs=0.5)
    assert rows[0]['params'] == '68050'
    assert rows[1]['steps'] == '100' and rows[1]['final_test_error_pct'] == ''
    assert rows[2]['status'] == 'no metrics'
    report = (workdir / 'report.md').read_text()
    assert 'No metrics: resnet32.' in report
    assert '| plain20 | plain20 | done | 300 | 5.00 | 22.00 | 20.00 | 62 |' \
        ' 0.07M |' in report
    assert (workdir / 'errors.png').stat().st_size > 10_000


# End to end on the trainer (configs/default.py:tiny), sharing one sweep.


def sweep_cli(command, *args, check=True, **kwargs):
  return subprocess.run(
      [sys.executable, 'sweep.py', command, *args], cwd=REPO, check=check,
      capture_output=True, text=True, timeout=300, **kwargs)


def wait_for(predicate, timeout_s, what):
  deadline = time.monotonic() + timeout_s
  while not predicate():
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.1)


def run_by_hand(commands):
  """Runs `list`'s shell commands one after the other, from the repo root."""
  for line in commands:
    argv = shlex.split(line)
    assert argv[:2] == ['python', 'train.py'], line
    subprocess.run([sys.executable, *argv[1:]], cwd=REPO, check=True,
                   capture_output=True, timeout=300)


@pytest.fixture(scope='module')
def tiny_sweep(tmp_path_factory):
  """The tiny sweep run, interrupted during its second run, then resumed;
  meanwhile its listed commands run by hand into a second sweep dir."""
  workdir = str(tmp_path_factory.mktemp('tiny_sweep'))
  by_hand = str(tmp_path_factory.mktemp('by_hand'))
  runs = sweep_lib.expand(sweep_lib.load_sweep(TINY_SWEEP), TINY_SWEEP)
  first, second = (os.path.join(workdir, r.name) for r in runs)
  listed = sweep_cli('list', f'--sweep={TINY_SWEEP}',
                     f'--workdir={by_hand}').stdout.splitlines()

  # `run` trains one run at a time: the hand runs use the other core.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    hand_runs = pool.submit(run_by_hand, listed)
    launcher = subprocess.Popen(
        [sys.executable, 'sweep.py', 'run', f'--sweep={TINY_SWEEP}',
         f'--workdir={workdir}'], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
      wait_for(lambda: sweep_lib.is_done(first) and os.path.exists(
          os.path.join(second, 'train.log')), 300, 'the first run to finish')
      time.sleep(1.0)
      launcher.send_signal(signal.SIGTERM)
      interrupted_output = launcher.communicate(timeout=60)[0]
    finally:
      launcher.kill()
    finished = {
        'done_mtime': os.stat(os.path.join(first, 'done.json')).st_mtime_ns,
        'log_size': os.path.getsize(os.path.join(first, 'train.log'))}
    second_done_before = sweep_lib.is_done(second)
    resumed = sweep_cli('run', f'--sweep={TINY_SWEEP}',
                        f'--workdir={workdir}')
    hand_runs.result()
  return dict(workdir=workdir, by_hand=by_hand, listed=listed, runs=runs,
              first=first, second=second,
              interrupted_rc=launcher.returncode,
              interrupted_output=interrupted_output, finished=finished,
              second_done_before=second_done_before, resumed=resumed)


def comparable_metrics(run_dir):
  """metrics.jsonl merged by step (a resumed run wrote some steps twice),
  without the fields that time the machine."""
  rows = sweep_report.read_metrics(os.path.join(run_dir, 'metrics.jsonl'))
  return {step: {k: v for k, v in row.items() if not TIMING.search(k)}
          for step, row in rows.items()}


class TestEndToEnd:

  def test_interrupted_sweep_stops_and_resumes(self, tiny_sweep):
    assert tiny_sweep['interrupted_rc'] != 0, tiny_sweep['interrupted_output']
    assert 'interrupted' in tiny_sweep['interrupted_output']
    assert not tiny_sweep['second_done_before']
    assert 'done, skipped' in tiny_sweep['resumed'].stderr
    assert sweep_lib.is_done(tiny_sweep['second'])
    # The finished run was not started again.
    first = tiny_sweep['first']
    assert tiny_sweep['finished'] == {
        'done_mtime': os.stat(os.path.join(first, 'done.json')).st_mtime_ns,
        'log_size': os.path.getsize(os.path.join(first, 'train.log'))}
    with open(os.path.join(tiny_sweep['second'], 'train.log')) as f:
      starts = [l for l in f if l.startswith('# sweep: ')]
    assert [s.split()[2] for s in starts[:2]] == ['starting', 'stopped']
    assert len(starts) == 3 and starts[2].split()[2] in ('starting',
                                                         'resuming')

  def test_report_has_a_row_per_run_and_figures(self, tiny_sweep):
    sweep_cli('report', f'--sweep={TINY_SWEEP}',
              f'--workdir={tiny_sweep["workdir"]}')
    with open(os.path.join(tiny_sweep['workdir'], 'report.csv')) as f:
      rows = list(csv.DictReader(f))
    assert [r['run'] for r in rows] == [r.name for r in tiny_sweep['runs']]
    for row in rows:
      assert row['status'] == 'done'
      assert 0 <= float(row['final_test_error_pct']) <= 100
      assert int(row['params']) > 0
    assert os.path.getsize(
        os.path.join(tiny_sweep['workdir'], 'errors.png')) > 10_000

  def test_listed_commands_reproduce_the_runs(self, tiny_sweep):
    assert len(tiny_sweep['listed']) == len(tiny_sweep['runs'])
    for line, run in zip(tiny_sweep['listed'], tiny_sweep['runs']):
      hand_dir = os.path.join(tiny_sweep['by_hand'], run.name)
      assert f'--workdir={hand_dir}' in shlex.split(line)
      by_hand = comparable_metrics(hand_dir)
      assert by_hand and 'eval/accuracy' in by_hand[max(by_hand)]
      assert by_hand == comparable_metrics(
          os.path.join(tiny_sweep['workdir'], run.name))


@pytest.mark.parametrize('runs, message', [
    ("axis('modle', ['plain20'])", "unknown config field 'modle'"),
    ("axis('model', ['resnet20', 'resnet21'])", "unknown model 'resnet21'"),
])
def test_bad_sweep_fails_before_any_run(tmp_path, runs, message):
  path = write_sweep(tmp_path, runs, config='configs/default.py:tiny')
  result = sweep_cli('run', f'--sweep={path}',
                     f'--workdir={tmp_path / "sweep"}', check=False)
  assert result.returncode != 0
  assert message in result.stderr and path in result.stderr
  assert not (tmp_path / 'sweep').exists()
