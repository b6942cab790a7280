"""Two tiny runs (plain vs residual) of the tiny config: the sweep tests' run.

  python sweep.py run --sweep=configs/sweeps/tiny.py --workdir=/tmp/tiny
"""

from resnet.sweep import Sweep, axis


def get_sweep():
  return Sweep(config='configs/default.py:tiny',
               runs=axis('model', ['plain20', 'resnet20']))
