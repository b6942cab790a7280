"""The paper's CIFAR recipe applied to CIFAR-100 (not in the paper).

Everything as configs/cifar10.py (batch 128, lr 0.1 /10 at 32k and 48k,
64k iterations, weight decay 1e-4, option A shortcuts); only the data set,
and so the head's 100 classes, differ.

  python train.py --config=configs/cifar100.py:resnet110 --workdir=runs/c100
"""

import ml_collections

from configs import cifar10


def get_config(arg: str = 'resnet20') -> ml_collections.ConfigDict:
  """`arg`: a CIFAR model name, e.g. 'resnet56' or 'plain20'."""
  return cifar10.get_config(arg, dataset='cifar100')
