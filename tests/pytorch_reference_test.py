"""Tests for benchmarks/pytorch_reference.py: the same networks as
resnet.models. torch is no dependency of the project, so these run only
where it is installed (`pip install torch`) and are skipped elsewhere."""

import os
import sys

import pytest

from resnet import models

torch = pytest.importorskip('torch')
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'benchmarks'))
import pytorch_reference  # pylint: disable=g-import-not-at-top


@pytest.mark.parametrize('name,num_classes,size', [
    ('resnet18', 1000, 224), ('resnet50', 1000, 224), ('resnet20', 10, 32)])
def test_same_parameters_and_outputs_as_resnet_models(name, num_classes,
                                                      size):
  network = pytorch_reference.create(name, num_classes)
  count = sum(p.numel() for p in network.parameters())
  expected = models.summary(models.create(name, num_classes=num_classes),
                            (size, size, 3)).total_params
  assert count == expected
  logits = network(torch.zeros(2, 3, size, size))
  assert tuple(logits.shape) == (2, num_classes)


@pytest.mark.parametrize('name', ['resnet21', 'plain20', 'resnet', 'resnet2'])
def test_unknown_model_is_rejected(name):
  with pytest.raises(ValueError, match=f"model='{name}'; accepted"):
    pytorch_reference.create(name, 10)
