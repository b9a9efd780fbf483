"""Recognising activations after a Conv (passes/activations.py), on small hand-built graphs.

The builders here (:class:`Builder`, :func:`conv_act_model`, :data:`FORMS`) are shared with
``test_fuse_conv_activation.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_compress.ir.graph import to_graph
from onnx_compress.passes.activations import ActivationMatch, Declined, close_to, match_activation

PADDLE_SIXTH = 0.16666670143604279  # what paddle2onnx writes for 1/6 (float32 0.1666667)


class Builder:
    """Collects nodes and constants; constants are initializers or ``Constant`` nodes."""

    def __init__(self, constants: str = "initializer"):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[str] = []
        self.constants = constants
        self.output_shape: list | None = None
        self._count = 0

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{base}_{self._count}"

    def const(self, value, dtype=np.float32, base: str = "k") -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self.fresh(base)
        if self.constants == "initializer":
            self.inits.append(numpy_helper.from_array(arr, name))
        else:
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name)))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.fresh(op_type), **attrs))
        return out

    def input(self, name: str, shape, dtype=TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def model(self, opset: int) -> onnx.ModelProto:
        outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, self.output_shape) for name in self.outputs]
        graph = helper.make_graph(self.nodes, "g", self.inputs, outputs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 7 if opset <= 13 else 8
        onnx.checker.check_model(model, full_check=True)
        return model


def conv_act_model(
    act: Callable[[Builder, str], str],
    *,
    opset: int = 13,
    constants: str = "initializer",
    bias: bool = True,
    group: int = 1,
    channels: int = 4,
    weight_input: bool = False,
    conv_attrs: dict | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """x[N, C, 8, 8] -> Conv(3x3) -> act -> y. ``act`` builds the activation from the Conv output."""
    rng = np.random.default_rng(seed)
    b = Builder(constants)
    b.output_shape = ["N", channels, "H", "W"]
    x = b.input("x", ["N", channels, 8, 8])
    w_value = rng.normal(size=(channels, channels // group, 3, 3)).astype(np.float32)
    if weight_input:
        w = b.input("w", list(w_value.shape))
    else:
        w = b.const(w_value, base="w")
    inputs = [x, w]
    if bias:
        inputs.append(b.const(rng.normal(size=channels), base="b"))
    attrs = {"pads": [1, 1, 1, 1], "group": group, "kernel_shape": [3, 3]}
    attrs.update(conv_attrs or {})
    attrs = {k: v for k, v in attrs.items() if v is not None}
    c = b.op("Conv", inputs, **attrs)
    b.outputs.append(act(b, c))
    return b.model(opset)


# ---------------------------------------------------------------------------------------------
# activation forms: builder, canonical kind, lowest opset


def _hardswish_add_clip(scale_first: bool, use_mul: bool, swap: bool = False, add_const=3.0, div=6.0):
    def build(b: Builder, c: str) -> str:
        t = b.op("Add", [b.const(add_const), c] if swap else [c, b.const(add_const)])
        t = b.op("Clip", [t, b.const(0.0), b.const(6.0)])
        scale = (lambda v: b.op("Mul", [v, b.const(1.0 / 6.0)])) if use_mul else (lambda v: b.op("Div", [v, b.const(div)]))
        if scale_first:
            return b.op("Mul", [c, scale(t)] if not swap else [scale(t), c])
        return scale(b.op("Mul", [t, c] if swap else [c, t]))

    return build


def _relu_min(b: Builder, c: str) -> str:
    t = b.op("Relu", [b.op("Add", [c, b.const(3.0)])])
    return b.op("Div", [b.op("Mul", [c, b.op("Min", [t, b.const(6.0)])]), b.const(6.0)])


@dataclass(frozen=True)
class Form:
    build: Callable[[Builder, str], str]
    kind: str
    min_opset: int = 11


FORMS: dict[str, Form] = {
    "relu": Form(lambda b, c: b.op("Relu", [c]), "Relu"),
    "relu6-clip": Form(lambda b, c: b.op("Clip", [c, b.const(0.0), b.const(6.0)]), "Clip"),
    "clip-any": Form(lambda b, c: b.op("Clip", [c, b.const(-1.5), b.const(2.5)]), "Clip"),
    "clip-max-only": Form(lambda b, c: b.op("Clip", [c, "", b.const(1.0)]), "Clip"),
    "clip-min-only": Form(lambda b, c: b.op("Clip", [c, b.const(-0.5)]), "Clip"),
    "leakyrelu": Form(lambda b, c: b.op("LeakyRelu", [c], alpha=0.1), "LeakyRelu"),
    "leakyrelu-default": Form(lambda b, c: b.op("LeakyRelu", [c]), "LeakyRelu"),
    "prelu": Form(lambda b, c: b.op("PRelu", [c, b.const([[[0.1]], [[0.2]], [[-0.3]], [[0.4]]])]), "PRelu"),
    "hardsigmoid": Form(lambda b, c: b.op("HardSigmoid", [c], alpha=0.3, beta=0.4), "HardSigmoid"),
    "hardsigmoid-default": Form(lambda b, c: b.op("HardSigmoid", [c]), "HardSigmoid"),
    "sigmoid": Form(lambda b, c: b.op("Sigmoid", [c]), "Sigmoid"),
    "tanh": Form(lambda b, c: b.op("Tanh", [c]), "Tanh"),
    "hardswish-op": Form(lambda b, c: b.op("HardSwish", [c]), "HardSwish", 14),
    "hardswish-add-clip-mul-div": Form(_hardswish_add_clip(False, False), "HardSwish"),
    "hardswish-add-clip-div-mul": Form(_hardswish_add_clip(True, False), "HardSwish"),
    "hardswish-add-clip-mul-mulsixth": Form(_hardswish_add_clip(False, True), "HardSwish"),
    "hardswish-add-clip-mulsixth-mul": Form(_hardswish_add_clip(True, True), "HardSwish"),
    "hardswish-swapped-operands": Form(_hardswish_add_clip(False, False, swap=True), "HardSwish"),
    "hardswish-relu-min": Form(_relu_min, "HardSwish"),
    "hardswish-hardsigmoid-mul": Form(
        lambda b, c: b.op("Mul", [c, b.op("HardSigmoid", [c], alpha=1.0 / 6.0, beta=0.5)]), "HardSwish"
    ),
    "hardswish-paddle-hardsigmoid-mul": Form(
        lambda b, c: b.op("Mul", [b.op("HardSigmoid", [c], alpha=PADDLE_SIXTH, beta=0.5), c]), "HardSwish"
    ),
    "silu": Form(lambda b, c: b.op("Mul", [c, b.op("Sigmoid", [c])]), "SiLU"),
    "silu-swapped": Form(lambda b, c: b.op("Mul", [b.op("Sigmoid", [c]), c]), "SiLU"),
    "silu-paddle-swish": Form(lambda b, c: b.op("Mul", [c, b.op("Sigmoid", [b.op("Mul", [c, b.const(1.0)])])]), "SiLU"),
}

#: HardSwish forms and the number of nodes each is written with
HARDSWISH_NODES = {
    "hardswish-op": 1,
    "hardswish-add-clip-mul-div": 4,
    "hardswish-add-clip-div-mul": 4,
    "hardswish-add-clip-mul-mulsixth": 4,
    "hardswish-add-clip-mulsixth-mul": 4,
    "hardswish-swapped-operands": 4,
    "hardswish-relu-min": 5,
    "hardswish-hardsigmoid-mul": 2,
    "hardswish-paddle-hardsigmoid-mul": 2,
}


def _conv_output_match(model: onnx.ModelProto):
    graph = to_graph(model)
    conv = next(n for n in graph.nodes if n.op == "Conv")
    return graph, match_activation(graph, conv.outputs[0], opset=int(graph.opset), x_rank=4)


# ---------------------------------------------------------------------------------------------
# positives


@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_form_is_recognised_with_all_its_nodes(form):
    spec = FORMS[form]
    model = conv_act_model(spec.build, opset=17 if spec.min_opset >= 14 else 13)
    graph, found = _conv_output_match(model)
    assert isinstance(found, ActivationMatch), found
    assert found.kind == spec.kind
    # the match covers every node after the Conv (constants aside) and ends at the graph output
    after_conv = [n for n in graph.nodes if n.op not in ("Conv", "Constant")]
    assert {id(n) for n in found.nodes} == {id(n) for n in after_conv}
    assert found.output.name == model.graph.output[0].name
    if form in HARDSWISH_NODES:
        assert len(found.nodes) == HARDSWISH_NODES[form]


def test_decomposed_forms_are_named():
    _, found = _conv_output_match(conv_act_model(FORMS["hardswish-add-clip-mul-div"].build))
    assert found.form == "Add-Clip-Mul-Div"
    _, found = _conv_output_match(conv_act_model(FORMS["hardswish-add-clip-mulsixth-mul"].build))
    assert found.form == "Add-Clip-Mul-Mul"
    _, found = _conv_output_match(conv_act_model(FORMS["silu-paddle-swish"].build))
    assert found.form == "Mul-Sigmoid-Mul"


def test_attributes_and_bound_inputs_are_reported_with_defaults():
    _, found = _conv_output_match(conv_act_model(FORMS["leakyrelu-default"].build))
    assert found.attrs == {"alpha": pytest.approx(0.01)}
    _, found = _conv_output_match(conv_act_model(FORMS["hardsigmoid"].build))
    assert found.attrs == {"alpha": pytest.approx(0.3), "beta": pytest.approx(0.4)}
    _, found = _conv_output_match(conv_act_model(FORMS["clip-max-only"].build))
    assert found.inputs["min"] is None and found.inputs["max"] is not None
    _, found = _conv_output_match(conv_act_model(FORMS["prelu"].build))
    assert found.inputs["slope"].name.startswith("k_")


def test_constants_in_constant_nodes_are_read():
    model = conv_act_model(FORMS["hardswish-add-clip-mul-div"].build, constants="node")
    assert any(n.op_type == "Constant" for n in model.graph.node)
    _, found = _conv_output_match(model)
    assert isinstance(found, ActivationMatch) and found.kind == "HardSwish"


def test_se_gate_hardsigmoid_times_other_tensor_is_only_hardsigmoid():
    # SE block: Conv -> HardSigmoid -> Mul(features, gate): the Mul is not part of the activation
    def build(b, c):
        other = b.input("other", ["N", 4, 8, 8])
        return b.op("Mul", [other, b.op("HardSigmoid", [c], alpha=1.0 / 6.0, beta=0.5)])

    _, found = _conv_output_match(conv_act_model(build))
    assert isinstance(found, ActivationMatch)
    assert found.kind == "HardSigmoid" and len(found.nodes) == 1


def test_plain_consumer_is_not_an_activation():
    _, found = _conv_output_match(conv_act_model(lambda b, c: b.op("Add", [c, b.const(1.0)])))
    assert found is None


# ---------------------------------------------------------------------------------------------
# declined


def _declined(build, **kwargs) -> str:
    _, found = _conv_output_match(conv_act_model(build, **kwargs))
    assert isinstance(found, Declined), found
    return found.reason


def test_wrong_hardswish_constants_are_declined():
    assert "expected 3" in _declined(_hardswish_add_clip(False, False, add_const=2.0))
    assert "expected 6" in _declined(_hardswish_add_clip(False, False, div=5.0))
    reason = _declined(lambda b, c: b.op("Mul", [c, b.op("HardSigmoid", [c], alpha=0.2, beta=0.5)]))
    assert "not HardSwish" in reason


def test_intermediate_with_another_reader_is_declined():
    def build(b, c):
        t = b.op("Add", [c, b.const(3.0)])
        b.outputs.append(b.op("Relu", [t]))
        return b.op("Div", [b.op("Mul", [c, b.op("Clip", [t, b.const(0.0), b.const(6.0)])]), b.const(6.0)])

    assert "also read by Relu" in _declined(build)


def test_intermediate_graph_output_is_declined():
    def build(b, c):
        s = b.op("Sigmoid", [c])
        b.outputs.append(s)
        return b.op("Mul", [c, s])

    assert "graph output" in _declined(build)


def test_non_constant_clip_bound_and_prelu_slope_are_declined():
    def clip(b, c):
        return b.op("Clip", [c, b.input("lo", []), b.const(6.0)])

    assert "Clip min is not a constant" in _declined(clip)

    def prelu(b, c):
        return b.op("PRelu", [c, b.input("slope", [4, 1, 1])])

    assert "slope is not a constant" in _declined(prelu)


def test_clip_attribute_form_before_opset_11_is_declined():
    assert "opset < 11" in _declined(lambda b, c: b.op("Clip", [c], min=0.0, max=6.0), opset=10)


def test_activation_next_to_another_reader_is_declined():
    def build(b, c):
        b.outputs.append(b.op("Add", [c, b.const(1.0)]))
        return b.op("Relu", [c])

    assert "not only by the activation" in _declined(build)


def test_close_to_is_a_few_ulp_of_the_constants_dtype():
    assert close_to(PADDLE_SIXTH, 1 / 6, np.dtype(np.float32))
    assert not close_to(0.1667, 1 / 6, np.dtype(np.float32))
    assert close_to(float(np.float16(1 / 6)), 1 / 6, np.dtype(np.float16))
    assert close_to(0.0, 0.0, np.dtype(np.float32)) and not close_to(1e-6, 0.0, np.dtype(np.float32))
