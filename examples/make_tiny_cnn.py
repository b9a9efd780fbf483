"""Build the bundled example: a small CNN with unfused BatchNorm, decomposed HardSwish and
clean-up work (Identity, Dropout), the way legacy exporters write them.

    python examples/make_tiny_cnn.py examples/tiny_cnn.onnx

Weights are seeded random (BatchNorm statistics included), so the file is reproducible.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def conv_bn(x, cin, cout, k, name, group=1, stride=1):
        w = const(f"{name}.weight", rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / (cin // group * k * k)))
        nodes.append(helper.make_node("Conv", [x, w], [f"{name}.conv"], name=f"{name}/Conv", kernel_shape=[k, k],
                                      pads=[k // 2] * 4, strides=[stride, stride], group=group))
        bn = [const(f"{name}.bn.{p}", v) for p, v in (
            ("scale", rng.uniform(0.5, 1.5, cout)), ("bias", rng.normal(0, 0.1, cout)),
            ("mean", rng.normal(0, 0.1, cout)), ("var", rng.uniform(0.5, 2.0, cout)))]
        nodes.append(helper.make_node("BatchNormalization", [f"{name}.conv", *bn], [f"{name}.bn"], name=f"{name}/BN", epsilon=1e-5))
        return f"{name}.bn"

    def relu(x, name):
        nodes.append(helper.make_node("Relu", [x], [f"{name}.relu"], name=f"{name}/Relu"))
        return f"{name}.relu"

    def hardswish(x, name):
        three, zero, six = const(f"{name}.three", 3.0), const(f"{name}.zero", 0.0), const(f"{name}.six", 6.0)
        nodes.append(helper.make_node("Add", [x, three], [f"{name}.add"], name=f"{name}/Add"))
        nodes.append(helper.make_node("Clip", [f"{name}.add", zero, six], [f"{name}.clip"], name=f"{name}/Clip"))
        nodes.append(helper.make_node("Mul", [x, f"{name}.clip"], [f"{name}.mul"], name=f"{name}/Mul"))
        nodes.append(helper.make_node("Div", [f"{name}.mul", six], [f"{name}.hswish"], name=f"{name}/Div"))
        return f"{name}.hswish"

    h = relu(conv_bn("image", 3, 16, 3, "stem", stride=2), "stem")
    nodes.append(helper.make_node("Identity", [h], ["stem.identity"], name="stem/Identity"))
    b = relu(conv_bn("stem.identity", 16, 16, 3, "block1a"), "block1a")
    b = conv_bn(b, 16, 16, 3, "block1b")
    nodes.append(helper.make_node("Add", ["stem.identity", b], ["block1.sum"], name="block1/Add"))
    h = relu("block1.sum", "block1")
    h = hardswish(conv_bn(h, 16, 16, 3, "dw", group=16), "dw")
    h = hardswish(conv_bn(h, 16, 32, 1, "pw"), "pw")
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["pool"], name="head/Pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="head/Flatten", axis=1))
    nodes.append(helper.make_node("Dropout", ["flat"], ["drop"], name="head/Dropout"))
    fc_w = const("fc.weight", rng.standard_normal((10, 32)) * 0.2)
    fc_b = const("fc.bias", rng.normal(0, 0.1, 10))
    nodes.append(helper.make_node("Gemm", ["drop", fc_w, fc_b], ["logits"], name="head/Gemm", transB=1))

    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="onnx-compress-example")
    model.ir_version = 8
    helper.set_model_props(model, {"classes": ",".join(str(i) for i in range(10)), "source": "examples/make_tiny_cnn.py"})
    onnx.checker.check_model(model, full_check=True)
    return model


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "examples/tiny_cnn.onnx"
    onnx.save_model(build(), out)
    print(f"wrote {out}")
