"""FoldBatchNormPass: positive cases (parity + structure) and declined cases (graph untouched)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_compress
from onnx_compress.ir.graph import to_graph, to_model
from onnx_compress.passes import BatchNormToMulAddPass, FoldBatchNormPass, PassManager
from onnx_compress.passes.registry import DEFAULT_PIPELINE
from tests.numerics import assert_parity, op_count

FLOAT = TensorProto.FLOAT


# ---------------------------------------------------------------------------------------------
# builders (also used by test_batchnorm_to_mul_add.py)


class Builder:
    """Collects nodes and weights; weights become initializers or Constant nodes."""

    def __init__(self, seed: int = 0, *, constant_nodes: bool = False, dtype=np.float32):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.constant_nodes = constant_nodes
        self.dtype = dtype

    def const(self, name: str, array) -> str:
        tensor = numpy_helper.from_array(np.asarray(array, dtype=self.dtype), name)
        if self.constant_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}/Constant", value=tensor))
        else:
            self.inits.append(tensor)
        return name

    def node(self, op: str, inputs, output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=f"{output}/{op}", **attrs))
        return output

    def bn_stats(self, name: str, channels: int) -> list[str]:
        rng = self.rng
        return [
            self.const(f"{name}.gamma", rng.uniform(0.5, 1.5, channels)),
            self.const(f"{name}.beta", rng.normal(0, 0.5, channels)),
            self.const(f"{name}.mean", rng.normal(0, 0.5, channels)),
            self.const(f"{name}.var", rng.uniform(0.2, 2.0, channels)),
        ]

    def bn(self, x: str, channels: int, output: str, **attrs) -> str:
        attrs.setdefault("epsilon", 1e-3)
        return self.node("BatchNormalization", [x, *self.bn_stats(output, channels)], output, **attrs)

    def model(self, inputs, outputs, *, opset: int = 17) -> onnx.ModelProto:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))
        ins = [i if isinstance(i, onnx.ValueInfoProto) else helper.make_tensor_value_info(i[0], elem, i[1]) for i in inputs]
        outs = [o if isinstance(o, onnx.ValueInfoProto) else helper.make_tensor_value_info(o[0], elem, o[1]) for o in outputs]
        graph = helper.make_graph(self.nodes, "g", ins, outs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="test")
        model.ir_version = 8
        # outputs given without a shape take the inferred one (the checker requires a shape);
        # intermediate tensors keep no value_info, as many exporters write them
        inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(model).graph.output}
        for out in model.graph.output:
            if not out.type.tensor_type.HasField("shape"):
                out.CopyFrom(inferred[out.name])
        onnx.checker.check_model(model, full_check=True)
        return model


def run_pass(pass_, model: onnx.ModelProto):
    """(result model, PassResult) of one pass on a ModelProto."""
    graph = to_graph(model)
    result = pass_.call(graph)
    return to_model(result.graph, like=model), result


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def assert_declined(model: onnx.ModelProto, result, fragment: str) -> None:
    assert not result.modified and result.changes == 0
    assert any(fragment in reason for _, reason in result.declined), result.declined


# ---------------------------------------------------------------------------------------------
# Conv


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("group", [1, 2, 8])
def test_conv_bn_folds(bias, group):
    b = Builder(group)
    cin, cout = 8, 8
    w = b.const("w", b.rng.standard_normal((cout, cin // group, 3, 3)))
    ins = ["x", w] + ([b.const("b", b.rng.standard_normal(cout))] if bias else [])
    b.node("Conv", ins, "c", pads=[1, 1, 1, 1], group=group)
    b.bn("c", cout, "y")
    b.node("Relu", ["y"], "out")
    model = b.model([("x", [1, cin, 6, 6])], [("out", None)])

    out = FoldBatchNormPass()(model)
    assert isinstance(out, onnx.ModelProto)
    assert ops(out) == ["Conv", "Relu"]
    conv = out.graph.node[0]
    assert len(conv.input) == 3 and conv.input[2]
    assert {i.name for i in out.graph.initializer} == {conv.input[1], conv.input[2]}
    assert_parity(model, out, rel_tol=1e-5)


def test_conv1d_bn_folds():
    b = Builder(3)
    b.node("Conv", ["x", b.const("w", b.rng.standard_normal((5, 4, 3)))], "c")
    b.bn("c", 5, "y")
    model = b.model([("x", [2, 4, 10])], [("y", None)])
    out, result = run_pass(FoldBatchNormPass(), model)
    assert result.changes == 1 and ops(out) == ["Conv"]
    assert out.graph.output[0].name == "y" and out.graph.node[0].output[0] == "y"
    assert_parity(model, out, rel_tol=1e-5)


def test_bn_output_is_graph_output_keeps_its_name():
    b = Builder(4)
    b.node("Conv", ["x", b.const("w", b.rng.standard_normal((4, 3, 1, 1)))], "c")
    b.bn("c", 4, "y")
    b.node("Relu", ["y"], "r")
    model = b.model([("x", [1, 3, 4, 4])], [("y", None), ("r", None)])
    out = FoldBatchNormPass()(model)
    assert [o.name for o in out.graph.output] == ["y", "r"]
    assert op_count(out, "BatchNormalization") == 0
    assert out.graph.node[0].op_type == "Conv" and out.graph.node[0].output[0] == "y"
    assert_parity(model, out, rel_tol=1e-5)


def test_dynamic_batch_dimension():
    b = Builder(5)
    b.node("Conv", ["x", b.const("w", b.rng.standard_normal((6, 3, 3, 3)))], "c", strides=[2, 2])
    b.bn("c", 6, "y")
    model = b.model([("x", ["N", 3, 9, 9])], [("y", ["N", 6, 4, 4])])
    out = FoldBatchNormPass()(model)
    assert op_count(out, "BatchNormalization") == 0
    dims = out.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N"
    feeds = [{"x": np.random.default_rng(i).standard_normal((n, 3, 9, 9)).astype(np.float32)} for i, n in enumerate((1, 5))]
    assert_parity(model, out, feeds=feeds, samples=0, rel_tol=1e-5)


def test_constant_node_weights_fold_without_initializers():
    b = Builder(6, constant_nodes=True)
    b.node("Conv", ["x", b.const("w", b.rng.standard_normal((4, 2, 3, 3))), b.const("bias", b.rng.standard_normal(4))],
           "c", group=2, pads=[1, 1, 1, 1])
    b.bn("c", 4, "y")
    b.node("ConvTranspose", ["y", b.const("wt", b.rng.standard_normal((4, 3, 2, 2)))], "d", strides=[2, 2])
    b.bn("d", 3, "z")
    model = b.model([("x", [1, 4, 5, 5])], [("z", None)])
    assert not model.graph.initializer
    out = FoldBatchNormPass()(model)
    assert op_count(out, "BatchNormalization") == 0
    assert not out.graph.initializer, "folded weights keep the Constant-node form"
    assert op_count(out, "Constant") == 4  # W' and b' for each of the two convolutions
    assert_parity(model, out, rel_tol=1e-5)


def test_float16_conv_bn():
    b = Builder(7, dtype=np.float16)
    b.node("Conv", ["x", b.const("w", b.rng.standard_normal((4, 3, 3, 3)) * 0.3)], "c")
    b.bn("c", 4, "y")
    model = b.model([("x", [1, 3, 8, 8])], [("y", None)])
    out = FoldBatchNormPass()(model)
    assert ops(out) == ["Conv"]
    assert all(i.data_type == TensorProto.FLOAT16 for i in out.graph.initializer)
    # fp16 has ~1e-3 relative precision: rounding W' and b' and accumulating 27 products in fp16
    # (and the original rounding BN's own intermediate results) stays within a few ulps of range.
    assert_parity(model, out, rel_tol=5e-3)


def test_shared_bias_folds_into_new_constants():
    b = Builder(8)
    bias = b.const("bias", b.rng.standard_normal(4))
    b.node("Conv", ["x", b.const("w1", b.rng.standard_normal((4, 3, 3, 3))), bias], "c1")
    b.node("Conv", ["x", b.const("w2", b.rng.standard_normal((4, 3, 3, 3))), bias], "c2")
    b.bn("c1", 4, "y1")
    b.node("Add", ["y1", "c2"], "out")
    model = b.model([("x", [1, 3, 6, 6])], [("out", None)])
    out = FoldBatchNormPass()(model)
    assert op_count(out, "BatchNormalization") == 0
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert convs[1].input[2] == "bias" and convs[0].input[2] != "bias"
    original = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "bias"))
    kept = numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == "bias"))
    np.testing.assert_array_equal(kept, original)
    assert_parity(model, out, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------
# ConvTranspose


@pytest.mark.parametrize(
    "cin,cout,group,bias",
    [(4, 6, 1, False), (4, 6, 1, True), (4, 6, 2, False), (6, 4, 2, True), (6, 9, 3, True), (5, 5, 5, False), (5, 5, 5, True)],
)
def test_convtranspose_bn_folds_any_group(cin, cout, group, bias):
    b = Builder(cin * 10 + group)
    w = b.const("w", b.rng.standard_normal((cin, cout // group, 3, 3)))
    ins = ["x", w] + ([b.const("b", b.rng.standard_normal(cout))] if bias else [])
    b.node("ConvTranspose", ins, "c", group=group, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])
    b.bn("c", cout, "y")
    model = b.model([("x", [2, cin, 4, 4])], [("y", None)])
    out, result = run_pass(FoldBatchNormPass(), model)
    assert result.changes == 1 and not result.declined
    assert ops(out) == ["ConvTranspose"] and len(out.graph.node[0].input) == 3
    assert_parity(model, out, rel_tol=1e-5)


def test_convtranspose_3d_group2():
    b = Builder(11)
    b.node("ConvTranspose", ["x", b.const("w", b.rng.standard_normal((4, 3, 2, 2, 2)))], "c", group=2)
    b.bn("c", 6, "y")
    model = b.model([("x", [1, 4, 3, 3, 3])], [("y", None)])
    out = FoldBatchNormPass()(model)
    assert ops(out) == ["ConvTranspose"]
    assert_parity(model, out, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------
# Gemm and MatMul

M, K, N = 4, 5, 3
C_SHAPES = {"none": None, "scalar": (), "one": (1,), "row": (N,), "row2d": (1, N), "col": (M, 1), "full": (M, N)}


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_kind", list(C_SHAPES))
def test_gemm_bn_folds_alpha_beta_and_c(trans_b, c_kind):
    b = Builder(20 + trans_b)
    w = b.const("w", b.rng.standard_normal((N, K) if trans_b else (K, N)))
    ins = ["x", w]
    if C_SHAPES[c_kind] is not None:
        ins.append(b.const("c_in", b.rng.standard_normal(C_SHAPES[c_kind])))
    b.node("Gemm", ins, "g", transB=trans_b, alpha=0.7, beta=1.3)
    b.bn("g", N, "y")
    model = b.model([("x", [M, K])], [("y", None)])
    out = FoldBatchNormPass()(model)
    assert ops(out) == ["Gemm"]
    gemm = out.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs["alpha"] == pytest.approx(1.0) and attrs["beta"] == pytest.approx(1.0)
    assert attrs.get("transB", 0) == trans_b
    assert len(gemm.input) == 3
    assert_parity(model, out, rel_tol=1e-5)


def test_gemm_transa_dynamic_batch():
    b = Builder(22)
    b.node("Gemm", ["x", b.const("w", b.rng.standard_normal((N, K))), b.const("c_in", b.rng.standard_normal(N))], "g",
           transA=1, transB=1, alpha=2.0)
    b.bn("g", N, "y")
    model = b.model([("x", [K, "batch"])], [("y", ["batch", N])])
    out = FoldBatchNormPass()(model)
    assert ops(out) == ["Gemm"]
    assert_parity(model, out, rel_tol=1e-5, input_shapes={"x": (K, 7)})


def test_matmul_2d_gets_following_add():
    b = Builder(23)
    b.node("MatMul", ["x", b.const("w", b.rng.standard_normal((K, N)))], "mm")
    b.bn("mm", N, "y")
    b.node("Relu", ["y"], "out")
    model = b.model([("x", ["batch", K])], [("out", None)])
    out = FoldBatchNormPass()(model)
    assert ops(out) == ["MatMul", "Add", "Relu"]
    assert_parity(model, out, rel_tol=1e-5, input_shapes={"x": (6, K)})


def test_matmul_bn_graph_output_name_kept():
    b = Builder(24)
    b.node("MatMul", ["x", b.const("w", b.rng.standard_normal((K, N)))], "mm")
    b.bn("mm", N, "y")
    model = b.model([("x", [2, K])], [("y", [2, N])])
    out = FoldBatchNormPass()(model)
    assert ops(out) == ["MatMul", "Add"]
    assert out.graph.node[1].output[0] == "y" and out.graph.output[0].name == "y"
    assert_parity(model, out, rel_tol=1e-5)


def test_matmul_3d_declined_then_mul_add():
    b = Builder(25)
    b.node("MatMul", ["x", b.const("w", b.rng.standard_normal((K, 3)))], "mm")
    b.bn("mm", 2, "y")  # BN channel axis 1 of [B, 2, 3] is not MatMul's column axis
    model = b.model([("x", [4, 2, K])], [("y", None)])
    # make the channel count equal the column count too, so only the rank can decline it
    b2 = Builder(25)
    b2.node("MatMul", ["x", b2.const("w", b2.rng.standard_normal((K, 3)))], "mm")
    b2.bn("mm", 3, "y")
    model3 = b2.model([("x", [4, 3, K])], [("y", None)])
    for m, fragment in ((model, "do not match"), (model3, "rank 3")):
        out, result = run_pass(FoldBatchNormPass(), m)
        assert_declined(out, result, fragment)
        assert ops(out) == ["MatMul", "BatchNormalization"]
    inferred = onnx.shape_inference.infer_shapes(model3)
    out = PassManager([FoldBatchNormPass(), BatchNormToMulAddPass()])(inferred)
    assert ops(out) == ["MatMul", "Mul", "Add"]
    assert_parity(model3, out, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------
# declined


def test_weight_graph_input_declined():
    b = Builder(30)
    b.node("Conv", ["x", "w"], "c")
    b.bn("c", 4, "y")
    model = b.model([("x", [1, 3, 5, 5]), ("w", [4, 3, 3, 3])], [("y", None)])
    out, result = run_pass(FoldBatchNormPass(), model)
    assert_declined(out, result, "weight is a graph input")
    assert ops(out) == ["Conv", "BatchNormalization"]
    assert out.graph.node[0].input[1] == "w"


def test_weight_from_non_constant_op_declined():
    b = Builder(31)
    b.node("Relu", ["wraw"], "w")
    b.node("Conv", ["x", "w"], "c")
    b.bn("c", 4, "y")
    model = b.model([("x", [1, 3, 5, 5]), ("wraw", [4, 3, 3, 3])], [("y", None)])
    out, result = run_pass(FoldBatchNormPass(), model)
    assert_declined(out, result, "weight is not constant")


def test_bias_not_constant_declined():
    b = Builder(32)
    b.node("Conv", ["x", b.const("w", b.rng.standard_normal((4, 3, 3, 3))), "bias"], "c")
    b.bn("c", 4, "y")
    model = b.model([("x", [1, 3, 5, 5]), ("bias", [4])], [("y", None)])
    out, result = run_pass(FoldBatchNormPass(), model)
    assert_declined(out, result, "bias is a graph input")
    assert ops(out) == ["Conv", "BatchNormalization"]


def test_nonconstant_statistics_declined_by_both_passes():
    b = Builder(33)
    b.node("Conv", ["x", b.const("w", b.rng.standard_normal((4, 3, 3, 3)))], "c")
    gamma, beta, _, var = b.bn_stats("bn", 4)
    b.node("BatchNormalization", ["c", gamma, beta, "mean", var], "y")
    model = b.model([("x", [1, 3, 5, 5]), ("mean", [4])], [("y", None)])
    out, result = run_pass(FoldBatchNormPass(), model)
    assert_declined(out, result, "mean is not constant")
    inferred = onnx.shape_inference.infer_shapes(model)
    out2, result2 = run_pass(BatchNormToMulAddPass(), inferred)
    assert_declined(out2, result2, "mean is not constant")
    full = onnx_compress.compress(model)
    assert ops(full) == ["Conv", "BatchNormalization"]
    assert_parity(model, full, rel_tol=1e-5)


def test_shared_weight_declined_and_falls_back_to_mul_add():
    b = Builder(34)
    w = b.const("w", b.rng.standard_normal((4, 3, 3, 3)))
    b.node("Conv", ["x", w], "c1")
    b.node("Conv", ["x", w], "c2")
    b.bn("c1", 4, "y1")
    b.bn("c2", 4, "y2")
    b.node("Add", ["y1", "y2"], "out")
    model = b.model([("x", [1, 3, 6, 6])], [("out", None)])
    out, result = run_pass(FoldBatchNormPass(), model)
    assert not result.modified
    assert [r for _, r in result.declined] == ["weight initializer shared outside the match"] * 2
    full = onnx_compress.compress(model)
    assert op_count(full, "BatchNormalization") == 0
    assert op_count(full, "Mul") == 2 and op_count(full, "Conv") == 2
    assert sum(1 for i in full.graph.initializer if i.name == "w") == 1
    assert_parity(model, full, rel_tol=1e-5)


def test_producer_output_with_other_consumer_declined():
    b = Builder(35)
    b.node("Conv", ["x", b.const("w", b.rng.standard_normal((4, 3, 3, 3)))], "c")
    b.bn("c", 4, "y")
    b.node("Relu", ["c"], "r")
    model = b.model([("x", [1, 3, 5, 5])], [("y", None), ("r", None)])
    out, result = run_pass(FoldBatchNormPass(), model)
    assert_declined(out, result, "other consumers")


def test_producer_output_is_graph_output_declined():
    b = Builder(36)
    b.node("Conv", ["x", b.const("w", b.rng.standard_normal((4, 3, 3, 3)))], "c")
    b.bn("c", 4, "y")
    model = b.model([("x", [1, 3, 5, 5])], [("c", None), ("y", None)])
    out, result = run_pass(FoldBatchNormPass(), model)
    assert_declined(out, result, "graph output")
    assert [o.name for o in out.graph.output] == ["c", "y"]


def test_training_mode_declined():
    b = Builder(37)
    b.node("Conv", ["x", b.const("w", b.rng.standard_normal((4, 3, 3, 3)))], "c")
    b.nodes.append(helper.make_node("BatchNormalization", ["c", *b.bn_stats("bn", 4)], ["y", "rm", "rv"],
                                    name="bn", training_mode=1))
    model = b.model([("x", [1, 3, 5, 5])], [("y", None), ("rm", None), ("rv", None)])
    for pass_ in (FoldBatchNormPass(), BatchNormToMulAddPass()):
        out, result = run_pass(pass_, onnx.shape_inference.infer_shapes(model))
        assert_declined(out, result, "training mode")
        assert ops(out) == ["Conv", "BatchNormalization"]


def test_bn_after_relu_is_not_a_fold_candidate():
    b = Builder(38)
    b.node("Relu", ["x"], "r")
    b.bn("r", 3, "y")
    model = b.model([("x", [1, 3, 4, 4])], [("y", None)])
    out, result = run_pass(FoldBatchNormPass(), model)
    assert not result.modified and not result.declined
    assert ops(out) == ["Relu", "BatchNormalization"]


# ---------------------------------------------------------------------------------------------
# pipeline and real exporters


def test_default_pipeline_order():
    i = DEFAULT_PIPELINE.index
    assert i("eliminate-noop") < i("fold-batchnorm") < i("batchnorm-to-mul-add") < i("remove-dead-nodes")


def test_tiny_cnn_all_batchnorms_folded(tiny_cnn):
    out, report = onnx_compress.compress_with_report(tiny_cnn)
    assert op_count(tiny_cnn, "BatchNormalization") == 5
    assert op_count(out, "BatchNormalization") == 0
    assert op_count(out, "Conv") == 5
    assert report.verification.passed
    assert_parity(tiny_cnn, out, rel_tol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_legacy_export_conv_bn_relu_and_grouped_convtranspose(tmp_path):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), nn.BatchNorm2d(6),
    )
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    net.eval()
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, do_constant_folding=False,
                      opset_version=17, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    model = onnx.load(str(path))
    assert op_count(model, "BatchNormalization") == 2
    out = FoldBatchNormPass()(model)
    assert op_count(out, "BatchNormalization") == 0
    assert ops(out) == ["Conv", "Relu", "ConvTranspose"]
    assert_parity(model, out, rel_tol=1e-5, input_shapes={"x": (3, 3, 8, 8)})
