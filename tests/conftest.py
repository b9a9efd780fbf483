import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture
def tiny_cnn():
    from examples.make_tiny_cnn import build

    return build()


@pytest.fixture
def tiny_cnn_path(tmp_path, tiny_cnn):
    import onnx

    path = tmp_path / "tiny_cnn.onnx"
    onnx.save_model(tiny_cnn, str(path))
    return path
