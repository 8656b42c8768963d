"""The bench's models, as eager factories the packager scripts (``file.py:factory``).

* ``build_mlp``: 64 -> 64 -> 10, overhead-bound (microseconds of compute per request).
* ``build_cnn``: a small conv net on 3 x 32 x 32, compute-bound; its widths are tuned
  so that raw torch does about 1.6k samples/s with 2 threads at its best batch on the
  2-core machine (issue 3's figure): measured as ~0.8k samples per CPU-second with one
  thread at batch 8-32 (CPU time, which the other tenants of the machine do not skew),
  i.e. ~1.25 ms of one core per sample.
* ``build_peer_mlp`` (256 -> 1024 -> 1024 -> 10) and ``build_peer_cnn`` (3 conv layers
  32/64/128 on 3 x 64 x 64): issue 12's models, served by edgeserve and by TorchServe
  side by side (``--peers torchserve``).
"""

from __future__ import annotations

import torch
from torch import nn

MLP_FEATURES = 64
CNN_INPUT = (3, 32, 32)
CNN_WIDTHS = (96, 192, 256)
PEER_MLP = (256, 1024, 1024, 10)
PEER_CNN_INPUT = (3, 64, 64)
PEER_CNN_WIDTHS = (32, 64, 128)


def build_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(MLP_FEATURES, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def _cnn(channels: int, widths: tuple[int, int, int]) -> nn.Module:
    """Three conv blocks, global pooling, a 10-way head (the bench's and the peers' CNN)."""
    torch.manual_seed(0)
    c1, c2, c3 = widths
    return nn.Sequential(
        nn.Conv2d(channels, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c3, 10),
    ).eval()


def build_cnn() -> nn.Module:
    return _cnn(CNN_INPUT[0], CNN_WIDTHS)


def build_peer_mlp() -> nn.Module:
    torch.manual_seed(0)
    a, b, c, d = PEER_MLP
    return nn.Sequential(
        nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c), nn.ReLU(), nn.Linear(c, d)
    ).eval()


def build_peer_cnn() -> nn.Module:
    return _cnn(PEER_CNN_INPUT[0], PEER_CNN_WIDTHS)
