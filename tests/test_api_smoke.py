import onnx

import onnx_compress
from tests.numerics import assert_parity, op_count


def test_compress_example_removes_noops_and_keeps_metadata(tiny_cnn):
    out = onnx_compress.compress(tiny_cnn)
    assert op_count(out, "Identity") == 0
    assert op_count(out, "Dropout") == 0
    assert [(p.key, p.value) for p in out.metadata_props] == [(p.key, p.value) for p in tiny_cnn.metadata_props]
    assert [i.name for i in out.graph.input] == [i.name for i in tiny_cnn.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in tiny_cnn.graph.output]
    assert_parity(tiny_cnn, out)


def test_compress_accepts_path_bytes_and_proto(tiny_cnn, tiny_cnn_path):
    a = onnx_compress.compress(str(tiny_cnn_path))
    b = onnx_compress.compress(tiny_cnn.SerializeToString())
    c = onnx_compress.compress(tiny_cnn)
    assert isinstance(a, onnx.ModelProto)
    assert a.SerializeToString() == b.SerializeToString() == c.SerializeToString()
