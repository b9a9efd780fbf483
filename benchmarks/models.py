"""Model builders shared by the benchmarks: ResNet-18/50 in plain torch, exported to ONNX and cached.

torchvision does not import beside the CPU torch wheel used here, so the networks are written out
by hand with torchvision's structure (and parameter names): a 7x7/2 stem Conv-BN-ReLU and a 3x3/2
MaxPool, four stages of residual blocks, global average pooling and one Linear layer.

* ResNet-18: ``BasicBlock`` (3x3 Conv-BN-ReLU, 3x3 Conv-BN, + shortcut, ReLU), stages [2, 2, 2, 2]:
  20 Conv and 20 BatchNormalization (17 in the blocks and the stem, 3 in downsample shortcuts).
* ResNet-50: ``Bottleneck`` (1x1 reduce, 3x3, 1x1 expand x4, + shortcut, ReLU), stages
  [3, 4, 6, 3]: 53 Conv and 53 BatchNormalization (1 stem + 16 x 3 + 4 downsample), 25.6 M
  parameters.

Weights are random but seeded (``torch.manual_seed``), and every BatchNorm gets non-trivial
statistics and affine parameters: ``running_mean ~ N(0, 0.1^2)``, ``running_var ~ U(0.5, 1.5)``,
``gamma ~ U(0.5, 1.5)``, ``beta ~ N(0, 0.1^2)``, so that a folding pass that ignored any of them
would change the outputs. That is enough for timing and parity; nothing here claims accuracy.

Export uses torch's legacy exporter (``dynamo=False``, ``opset_version=17``,
``do_constant_folding=False``): that is the combination that keeps every BatchNormalization as
its own node after its Conv (the dynamo exporter and constant folding both fold BN away).
Exported files are cached under ``~/.cache/onnx-compress-bench`` (or the folder given), keyed by
architecture, input size, seed, opset and torch version, and written atomically.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("ONNX_COMPRESS_BENCH_CACHE", Path.home() / ".cache" / "onnx-compress-bench"))
OPSET = 17

#: architecture -> (block kind, blocks per stage)
ARCHITECTURES: dict[str, tuple[str, list[int]]] = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}


def build_resnet(arch: str = "resnet50", *, num_classes: int = 1000, seed: int = 0, width: int = 64):
    """A torch ``nn.Module`` ResNet in eval mode with seeded weights and non-trivial BN statistics.

    ``width`` is the stem's channel count (64 in torchvision); stages use width x 1, 2, 4, 8. A
    small width keeps the exact graph structure (same Conv/BN count) with few parameters, for
    quick smoke tests.
    """
    import torch
    from torch import nn

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture '{arch}'; known: {', '.join(ARCHITECTURES)}")
    kind, layers = ARCHITECTURES[arch]

    def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)

    def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
            super().__init__()
            self.conv1 = conv3x3(inplanes, planes, stride)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = conv3x3(planes, planes)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
            super().__init__()
            self.conv1 = conv1x1(inplanes, planes)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = conv3x3(planes, planes, stride)  # torchvision v1.5: stride on the 3x3
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = conv1x1(planes, planes * self.expansion)
            self.bn3 = nn.BatchNorm2d(planes * self.expansion)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + identity)

    block = BasicBlock if kind == "basic" else Bottleneck

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inplanes = width
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            self.layer1 = self._make_layer(width, layers[0])
            self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
            self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
            self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

        def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
            downsample = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    conv1x1(self.inplanes, planes * block.expansion, stride),
                    nn.BatchNorm2d(planes * block.expansion),
                )
            mods = [block(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * block.expansion
            mods += [block(self.inplanes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*mods)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    torch.manual_seed(seed)
    model = ResNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def export_resnet(
    arch: str, path: str | os.PathLike, *, input_size: int = 224, seed: int = 0, width: int = 64,
    num_classes: int = 1000,
) -> Path:
    """Export :func:`build_resnet` to ``path`` (atomic write) with every BatchNormalization unfused."""
    import torch

    path = Path(path)
    model = build_resnet(arch, seed=seed, width=width, num_classes=num_classes)
    dummy = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter says it is legacy
            torch.onnx.export(
                model,
                (dummy,),
                tmp,
                dynamo=False,
                opset_version=OPSET,
                do_constant_folding=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def resnet_onnx(
    arch: str = "resnet50",
    *,
    input_size: int = 224,
    seed: int = 0,
    width: int = 64,
    num_classes: int = 1000,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Path of the cached ONNX export of ``arch``; exported on first use."""
    import torch

    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    tag = torch.__version__.split("+")[0]
    shape = "" if (width, num_classes) == (64, 1000) else f"_w{width}_c{num_classes}"
    path = cache / f"{arch}{shape}_{input_size}px_seed{seed}_opset{OPSET}_torch{tag}.onnx"
    if not path.is_file():
        logger.info("exporting %s to %s", arch, path)
        export_resnet(arch, path, input_size=input_size, seed=seed, width=width, num_classes=num_classes)
    return path


__all__ = ["ARCHITECTURES", "DEFAULT_CACHE_DIR", "build_resnet", "export_resnet", "resnet_onnx"]
