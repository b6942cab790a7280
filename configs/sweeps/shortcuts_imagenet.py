"""ImageNet ResNet-34 with shortcut options A, B and C, and plain-34 for
reference (He et al. 2015, Table 3).

A: zero-padding shortcuts where the dimensions grow (no parameters);
B: projections there, identity elsewhere; C: projections everywhere. The
paper's 10-crop top-1 errors: plain-34 28.54, A 25.03, B 24.52, C 24.19%
(single centre crops, as evaluated here, read 1-2 points higher). Each run
is 90 epochs of the paper's recipe (configs/imagenet.py:paper): send them
to accelerators with `list`.

  python sweep.py list --sweep=configs/sweeps/shortcuts_imagenet.py \
      --workdir=/shared/sweeps/shortcuts
  python sweep.py report --sweep=configs/sweeps/shortcuts_imagenet.py \
      --workdir=/shared/sweeps/shortcuts
"""

from resnet.sweep import Sweep, axis, concat


def get_sweep() -> Sweep:
  return Sweep(config='configs/imagenet.py:paper,resnet34',
               runs=concat({'model': 'plain34'},
                           axis('shortcut', ['A', 'B', 'C'])))
