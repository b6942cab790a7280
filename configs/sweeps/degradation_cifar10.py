"""CIFAR-10 plain vs residual nets of depth 20 to 110: the degradation
problem and its fix (He et al. 2015, Figure 6 and Table 6).

Ten runs of the paper's recipe (configs/cifar10.py: 64k iterations, batch
128, ResNet-110 and plain-110 warmed up at 0.01). The paper's curves: plain
nets train and test worse as they get deeper (plain-56 above plain-20,
plain-110 over 60% error), residual nets better; its Table 6 test errors
are 8.75 (ResNet-20), 7.51 (32), 7.17 (44), 6.97 (56) and 6.43% (110).

  python sweep.py run --sweep=configs/sweeps/degradation_cifar10.py
  python sweep.py list --sweep=configs/sweeps/degradation_cifar10.py \
      --workdir=/shared/sweeps/cifar10 > runs.txt  # For a cluster queue.
  python sweep.py report --sweep=configs/sweeps/degradation_cifar10.py

Add `axis('seed', [0, 1, 2, 3, 4])` to the product for the paper's five
runs per depth.
"""

from resnet.sweep import Sweep, axis, product

DEPTHS = (20, 32, 44, 56, 110)


def get_sweep() -> Sweep:
  # The config's variant sets the model and, for depth 110, the warm-up.
  variants = [f':{family}{depth}' for family in ('plain', 'resnet')
              for depth in DEPTHS]
  return Sweep(config='configs/cifar10.py',
               runs=product(axis('config', variants)))
