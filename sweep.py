"""Runs, lists or reports an ablation sweep (a grid of train.py runs).

  python sweep.py run --sweep=configs/sweeps/degradation_digits.py \
      --workdir=sweeps/degradation_digits --parallel=2
  python sweep.py list --sweep=...   # one train.py command per run
  python sweep.py report --sweep=... # report.md, report.csv, errors.png

Every run is validated before the first one starts; `run` skips finished
runs and resumes interrupted ones, so it can simply be started again.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from resnet import sweep as sweep_lib
from resnet import sweep_report

COMMANDS = ('run', 'list', 'report')

_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep file defining get_sweep().')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Sweep directory, one workdir per run inside it '
    '(default: sweeps/<sweep file name>).')
_PARALLEL = flags.DEFINE_integer(
    'parallel', 1, 'run: how many runs train at the same time.')
flags.mark_flag_as_required('sweep')


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(
        f'expected one command, got {argv[1:]}; accepted: {COMMANDS}')
  name = os.path.splitext(os.path.basename(_SWEEP.value))[0]
  workdir = _WORKDIR.value or os.path.join('sweeps', name)
  try:
    runs = sweep_lib.expand(sweep_lib.load_sweep(_SWEEP.value), _SWEEP.value)
  except ValueError as e:
    sys.exit(f'No run started: {e}')
  logging.info('%s: %d runs validated; sweep dir %s', _SWEEP.value, len(runs),
               workdir)

  if argv[1] == 'list':
    for run in runs:
      print(sweep_lib.command_line(run, workdir))
  elif argv[1] == 'run':
    try:
      failed = sweep_lib.run_all(runs, workdir, parallel=_PARALLEL.value)
    except KeyboardInterrupt:
      sys.exit('interrupted: the live runs were stopped; run the sweep again '
               'to resume them')
    if failed:
      sys.exit(f'{len(failed)} of {len(runs)} runs failed: '
               f'{", ".join(failed)}')
    logging.info('all %d runs done; `report` draws them', len(runs))
  else:
    sweep_report.write_report(runs, workdir, title=f'Sweep {name}')
    logging.info('wrote %s', os.path.join(workdir, 'report.md'))


if __name__ == '__main__':
  app.run(main)
