"""The degradation problem at small scale, on the embedded digits: a
56-layer plain net trains worse than a 20-layer one, a 56-layer residual net
does not (He et al. 2015, Figure 1 and Figure 6, in about 15 minutes on 2
CPU cores).

configs/default.py (1,437 training images at 32x32, batch 64, cosine
schedule) with 8 filters in the first stage instead of 16 and 6 epochs
(132 iterations), so that four runs fit the budget:

  python sweep.py run --sweep=configs/sweeps/degradation_digits.py \
      --parallel=2
  python sweep.py report --sweep=configs/sweeps/degradation_digits.py

README.md ("Ablation sweeps") has the table and figure measured here.
"""

from resnet.sweep import Sweep, axis


def get_sweep() -> Sweep:
  # The deep runs first: they take three times as long, and with two at a
  # time the sweep then ends with two short runs instead of one long one.
  return Sweep(
      config='configs/default.py',
      runs=axis('model', ['plain56', 'resnet56', 'plain20', 'resnet20']),
      fixed={'num_filters': 8, 'num_epochs': 6.0,
             # Curves: training error every half epoch, test every epoch.
             'log_every_steps': 11, 'eval_every_steps': 22})
