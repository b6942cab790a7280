"""PyTorch eager train step of the same ResNets, for in-run comparisons.

Machines of one kind differ by up to 2x in speed, so this project's step is
compared with PyTorch's on the same machine, in the same session:

  pip install torch          # Any recent CPU or CUDA build; not a dependency.
  python benchmarks/pytorch_reference.py --model=resnet18 --batch_size=32
  python benchmarks/pytorch_reference.py --model=resnet20 --batch_size=128 \
      --image_size=32

The networks are written here rather than taken from torchvision, whose
wheels must match the torch build exactly; they have the layers of
`resnet.models` (post-activation, option B shortcuts for ImageNet depths,
option A for CIFAR depths, v1 bottlenecks), so both steps do the same
arithmetic. The step is forward, softmax cross-entropy, backward and SGD
with momentum, timed to completion; the median is reported, as
`benchmark.py --mode=step` does. Prints one JSON object.
"""

import argparse
import json
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F

IMAGENET = {18: ('basic', (2, 2, 2, 2)), 34: ('basic', (3, 4, 6, 3)),
            50: ('bottleneck', (3, 4, 6, 3)),
            101: ('bottleneck', (3, 4, 23, 3))}


def conv_norm(in_features, out_features, kernel, stride=1):
  return nn.Sequential(
      nn.Conv2d(in_features, out_features, kernel, stride, kernel // 2,
                bias=False),
      nn.BatchNorm2d(out_features))


class Block(nn.Module):
  """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 x4) block."""

  def __init__(self, kind, in_features, features, stride, shortcut):
    super().__init__()
    if kind == 'basic':
      out = features
      self.branch = nn.Sequential(
          conv_norm(in_features, features, 3, stride), nn.ReLU(),
          conv_norm(features, features, 3))
    else:
      out = 4 * features
      self.branch = nn.Sequential(
          conv_norm(in_features, features, 1, stride), nn.ReLU(),
          conv_norm(features, features, 3), nn.ReLU(),
          conv_norm(features, out, 1))
    self.stride, self.pad = stride, out - in_features
    self.projection = None
    if shortcut == 'B' and (stride != 1 or self.pad):
      self.projection = conv_norm(in_features, out, 1, stride)
    self.out_features = out

  def forward(self, x):
    if self.projection is not None:
      shortcut = self.projection(x)
    else:  # Option A: subsample, zero-pad the new channels.
      shortcut = x[:, :, ::self.stride, ::self.stride]
      if self.pad:
        shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
    return F.relu(self.branch(x) + shortcut)


def create(model: str, num_classes: int) -> nn.Module:
  digits = model.removeprefix('resnet')
  depth = int(digits) if model.startswith('resnet') and digits.isdigit() else 0
  if depth in IMAGENET:
    kind, stage_sizes = IMAGENET[depth]
    width, shortcut = 64, 'B'
    stem = [conv_norm(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
  elif depth > 2 and (depth - 2) % 6 == 0:
    kind, stage_sizes = 'basic', ((depth - 2) // 6,) * 3
    width, shortcut = 16, 'A'
    stem = [conv_norm(3, 16, 3), nn.ReLU()]
  else:
    raise ValueError(f'model={model!r}; accepted: resnet18/34/50/101 or a '
                     'CIFAR depth 6n+2, e.g. resnet20.')
  layers, features = stem, width
  for i, num_blocks in enumerate(stage_sizes):
    for j in range(num_blocks):
      block = Block(kind, features, width * 2**i,
                    2 if i and not j else 1, shortcut)
      layers.append(block)
      features = block.out_features
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(),
             nn.Linear(features, num_classes)]
  return nn.Sequential(*layers)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='resnet18')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--num_classes', type=int, default=1000)
  parser.add_argument('--num_steps', type=int, default=10)
  parser.add_argument('--warmup_steps', type=int, default=2)
  parser.add_argument('--channels_last', action='store_true')
  args = parser.parse_args()

  torch.manual_seed(0)
  model = create(args.model, args.num_classes)
  images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
  labels = torch.randint(0, args.num_classes, (args.batch_size,))
  if args.channels_last:
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
  model.train()

  def step():
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()

  for _ in range(args.warmup_steps):
    step()
  times = []
  for _ in range(args.num_steps):
    started = time.perf_counter()
    step()
    times.append(time.perf_counter() - started)
  median = statistics.median(times)
  print(json.dumps({
      'framework': f'pytorch {torch.__version__}', 'model': args.model,
      'batch': args.batch_size, 'image_size': args.image_size,
      'channels_last': args.channels_last,
      'threads': torch.get_num_threads(),
      'images_per_sec': args.batch_size / median,
      'step_time_ms': 1e3 * median,
      'step_time_min_ms': 1e3 * min(times),
      'step_time_max_ms': 1e3 * max(times),
      'num_steps': args.num_steps,
  }))


if __name__ == '__main__':
  main()
