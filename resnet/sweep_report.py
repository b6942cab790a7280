"""Tables and figures of a sweep from its runs' metrics.jsonl files.

`write_report` writes report.md, report.csv and errors.png (training and
test error against iterations, one line per run, plain nets dashed and thin,
residual nets solid and bold, as in Figure 6 of He et al. 2015).
"""

import csv
import dataclasses
import json
import math
import os
from typing import Any, Sequence

from absl import logging
import ml_collections

from resnet import sweep as sweep_lib

CSV_FIELDS = ('status', 'steps', 'final_train_error_pct',
              'final_test_error_pct', 'best_test_error_pct', 'wall_time_s',
              'params')


@dataclasses.dataclass(frozen=True)
class Result:
  """What one run has written so far."""
  run: sweep_lib.Run
  # 'done'; 'partial' (no done.json yet); 'no metrics' (its workdir holds
  # none: failed early, see train.log); 'not started' (no workdir).
  status: str
  steps: int | None
  train_error: list[tuple[int, float]]  # (step, error in %) from train/.
  test_error: list[tuple[int, float]]  # (step, error in %) from eval/.
  wall_time_s: float | None
  params: int | None

  @property
  def final_train_error(self) -> float | None:
    return self.train_error[-1][1] if self.train_error else None

  @property
  def final_test_error(self) -> float | None:
    return self.test_error[-1][1] if self.test_error else None

  @property
  def best_test_error(self) -> float | None:
    return min(e for _, e in self.test_error) if self.test_error else None


def read_metrics(path: str) -> dict[int, dict[str, Any]]:
  """metrics.jsonl as {step: merged metrics}, steps in increasing order.

  A resumed run writes again the steps between its last checkpoint and the
  interruption; the later values win, as they are what the run continued
  from. A last line cut short by a killed run is skipped.
  """
  rows = {}
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and 'step' in row:
        rows.setdefault(int(row['step']), {}).update(row)
  return dict(sorted(rows.items()))


def _error_curve(rows, key: str) -> list[tuple[int, float]]:
  return [(step, 100.0 * (1.0 - float(row[key])))
          for step, row in rows.items()
          if key in row and math.isfinite(float(row[key]))]


_params_cache = {}


def count_params(config: ml_collections.ConfigDict) -> int | None:
  """Parameters of the run's network, from shapes only (nothing computed)."""
  key = json.dumps(config.to_dict(), sort_keys=True, default=str)
  if key not in _params_cache:
    try:
      _params_cache[key] = _count_params(config)
    except (ImportError, ValueError, KeyError, AttributeError, OSError) as e:
      # A report still gets written, without the count.
      logging.warning('parameters of %s not counted: %s', config.get('model'),
                      e)
      _params_cache[key] = None
  return _params_cache[key]


def _count_params(config) -> int:
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import tensorflow_datasets as tfds
  from resnet import input_pipeline  # Registers the digits builder.
  from resnet import train
  # pylint: enable=g-import-not-at-top
  del input_pipeline

  # The data set's metadata, not its files: a report of runs trained on
  # another machine counts parameters without ImageNet on this one. The
  # count does not depend on the image size (global pooling before the head).
  features = tfds.builder(
      config.dataset, data_dir=config.get('data_dir') or None).info.features
  channels = features['image'].shape[-1] or 3
  model = train.create_model(config, features['label'].num_classes)
  images = jnp.zeros((1, 32, 32, channels), jnp.float32)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), images, train=False))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes['params']))


def summarize(run: sweep_lib.Run, run_dir: str) -> Result:
  """Reads one run's workdir."""
  rows = read_metrics(os.path.join(run_dir, 'metrics.jsonl'))
  done = None
  if sweep_lib.is_done(run_dir):
    with open(os.path.join(run_dir, 'done.json')) as f:
      done = json.load(f)
  if done:
    status = 'done'
  elif rows:
    status = 'partial'
  else:  # Failed before its first metrics, or never launched.
    status = 'no metrics' if os.path.isdir(run_dir) else 'not started'
  steps = done['step'] if done else (max(rows) if rows else None)
  return Result(
      run=run, status=status, steps=steps,
      train_error=_error_curve(rows, 'train/accuracy'),
      test_error=_error_curve(rows, 'eval/accuracy'),
      wall_time_s=done.get('wall_time_s') if done else None,
      params=count_params(run.config))


def family(result: Result) -> str:
  """Figure panel of a run: plain or residual nets, like Figure 6."""
  model = str(result.run.config.get('model', ''))
  return 'plain' if model.startswith('plain') else 'residual'


def _fmt(value, digits=2) -> str:
  if value is None:
    return '-'
  return f'{value:.{digits}f}' if isinstance(value, float) else str(value)


def _rows(results: Sequence[Result]) -> tuple[list[str], list[list[str]]]:
  # The resolved model, then what else the runs vary; a config variant
  # (`config` key) shows through the model and the run name.
  keys = list(dict.fromkeys(
      k for r in results for k in r.run.overrides
      if k not in (sweep_lib.CONFIG_KEY, 'model')))
  with_model = all('model' in r.run.config for r in results)
  header = ['run', *(['model'] if with_model else []), *keys, *CSV_FIELDS]
  rows = []
  for r in results:
    model = [r.run.config.model] if with_model else []
    rows.append([r.run.name, *model,
                 *[_fmt(r.run.overrides.get(k)) for k in keys],
                 r.status, _fmt(r.steps), _fmt(r.final_train_error),
                 _fmt(r.final_test_error), _fmt(r.best_test_error),
                 _fmt(r.wall_time_s, 0), _fmt(r.params)])
  return header, rows


def _markdown(results, header, rows, title: str) -> str:
  names = {'final_train_error_pct': 'train err %',
           'final_test_error_pct': 'test err %',
           'best_test_error_pct': 'best test err %',
           'wall_time_s': 'wall time (s)'}
  lines = [f'# {title}', '',
           '| ' + ' | '.join(names.get(h, h) for h in header) + ' |',
           '|' + ' --- |' * len(header)]
  for row in rows:
    row = row[:-1] + [_millions(row[-1])]
    lines.append('| ' + ' | '.join(row) + ' |')
  waiting = {status: [r.run.name for r in results if r.status == status]
             for status in ('not started', 'no metrics')}
  lines += ['', 'Errors are top-1 in % on the eval split (test) and on the '
            'training batches of the last logging interval (train).', '',
            '![training and test error](errors.png)', '']
  for status, names in waiting.items():
    if names:
      lines += [f'{status.capitalize()}: {", ".join(names)}.', '']
  return '\n'.join(lines)


def _millions(text: str) -> str:
  return f'{int(text) / 1e6:.2f}M' if text.isdigit() else text


def plot_errors(results: Sequence[Result], path: str, title: str) -> None:
  """Training (top) and test (bottom) error vs iterations, a panel per family.

  Line colours follow the run's position in its panel, so plain20 and
  resnet20 share a colour when the sweep lists them in the same order.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  groups = {}
  for r in results:
    groups.setdefault(family(r), []).append(r)
  fig, axes = plt.subplots(2, len(groups), squeeze=False, sharex=True,
                           sharey='row',
                           figsize=(5 * len(groups), 7))
  for col, (group, members) in enumerate(groups.items()):
    for row, (split, curve) in enumerate(
        (('training', 'train_error'), ('test', 'test_error'))):
      ax = axes[row, col]
      for i, r in enumerate(members):
        points = getattr(r, curve)
        if not points:
          continue
        steps, errors = zip(*points)
        ax.plot(steps, errors, color=f'C{i % 10}',
                label=r.run.name.replace('model=', ''),
                linestyle='--' if group == 'plain' else '-',
                linewidth=1.0 if group == 'plain' else 2.0)
      ax.set_title(f'{group} nets: {split} error')
      ax.set_xlabel('iterations')
      ax.set_ylabel('error (%)')
      ax.set_ylim(bottom=0)
      ax.grid(alpha=0.3)
      if ax.lines:
        ax.legend(fontsize='small')
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def write_report(runs: Sequence[sweep_lib.Run], workdir: str,
                 title: str) -> list[Result]:
  """Writes report.md, report.csv and errors.png into the sweep dir."""
  os.makedirs(workdir, exist_ok=True)
  results = [summarize(r, os.path.join(workdir, r.name)) for r in runs]
  header, rows = _rows(results)
  with open(os.path.join(workdir, 'report.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows([['' if v == '-' else v for v in row] for row in rows])
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write(_markdown(results, header, rows, title))
  plot_errors(results, os.path.join(workdir, 'errors.png'), title)
  return results
