"""A small CNN trained here on scikit-learn's digits (real labels), shared by the tests that need a
trained network without downloading one: the INT8 accuracy tests and the pruning-reconstruction
test. Seeded, one torch thread, exported with torch's legacy exporter (BatchNormalization kept).
"""

from __future__ import annotations

import io
import warnings
from typing import Callable

import numpy as np
import onnx


def pruning_digits_net():
    """The conv net (3 Conv+BN+ReLU, 2 Linear) that the pruning-reconstruction test and
    ``benchmarks/bench_prune_accuracy.py`` train on the digits, untrained and seeded by the caller."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class DigitsNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 16, 3, padding=1)
            self.b1 = nn.BatchNorm2d(16)
            self.c2 = nn.Conv2d(16, 32, 3, padding=1)
            self.b2 = nn.BatchNorm2d(32)
            self.c3 = nn.Conv2d(32, 32, 3, padding=1, stride=2)
            self.b3 = nn.BatchNorm2d(32)
            self.fc1 = nn.Linear(32 * 16, 48)
            self.fc2 = nn.Linear(48, 10)

        def forward(self, x):
            x = F.relu(self.b1(self.c1(x)))
            x = F.relu(self.b2(self.c2(x)))
            x = F.relu(self.b3(self.c3(x)))
            return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))

    return DigitsNet()


def digits_split(train_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): 8x8 images scaled to [0, 1] as [N, 1, 8, 8] float32,
    split by a permutation seeded 0."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:train_count], order[train_count:]
    return x[train], y[train], x[test], y[test]


def train_and_export(
    make_net: Callable[[], "object"],
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    output_name: str = "logits",
    seeded_shuffle: bool = False,
) -> onnx.ModelProto:
    """Train ``make_net()`` (built after ``torch.manual_seed(0)``) with Adam and cross-entropy in
    batches of 64, then export it with input ``x`` and output ``output_name``, dynamic batch.

    ``seeded_shuffle``: draw the batch order from its own generator (seed 0) instead of torch's
    global one."""
    import torch

    nn = torch.nn
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = make_net()
        opt = torch.optim.Adam(net.parameters(), lr)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        generator = torch.Generator().manual_seed(0) if seeded_shuffle else None
        for _ in range(epochs):
            net.train()
            perm = torch.randperm(len(x), generator=generator)
            for i in range(0, len(x), 64):
                b = perm[i : i + 64]
                opt.zero_grad()
                nn.functional.cross_entropy(net(xt[b]), yt[b]).backward()
                opt.step()
        net.eval()
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter says it is legacy
            torch.onnx.export(
                net, (torch.zeros(1, 1, 8, 8),), buf, dynamo=False, opset_version=17, do_constant_folding=False,
                input_names=["x"], output_names=[output_name],
                dynamic_axes={"x": {0: "n"}, output_name: {0: "n"}},
            )
    finally:
        torch.set_num_threads(threads)
    return onnx.load_from_string(buf.getvalue())
