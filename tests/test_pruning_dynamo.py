"""Structured pruning on the *dynamo* ONNX exporter's graphs (issue 3, "both torch exporters").

Every plain-torch architecture of ``tests/test_pruning.py`` (plus a ResNet-18 from
``benchmarks/models.py`` at width 8, 32x32 input) is exported with ``torch.onnx.export(...,
dynamo=True)`` (opset 18, the exporter's default ``optimize=True``) and held to the same
acceptance as the legacy-exporter tests: at ratio 0.3 the pruned model passes ``onnx.checker``
(full check), runs in ONNX Runtime and equals the masked reference (original with the removed
channels made inert) within 1e-4 of each output's range (``check_pruned``); structurally, every
pruned constant shrank by exactly the planned count on the planned axis, the kept counts are the
legacy test's (uniform ratio, ``round(c * 0.7)`` rounded to a multiple of 8), channel shuffle is
frozen with its reason, and ratio 0 returns the weights bit-identical.

What the dynamo exporter emits differently from the legacy one (observed with torch 2.13 /
onnxscript; the assertions below pin these so a change of exporter shows up here):

* eval-mode ``BatchNormalization`` is folded into the preceding Conv by the exporter's optimizer:
  no BN is left to slice, and a bias-less Conv gains a ``<conv>.weight_bias`` initializer, which
  joins the Conv's output-channel group in place of the BN parameters;
* ``torch.flatten`` / ``view`` become ``Reshape`` with a constant shape (legacy: ``Flatten``), so
  the Flatten -> Gemm factorisation goes through the Reshape rule and its shape constant;
* ``adaptive_avg_pool2d(x, 1)`` becomes ``ReduceMean`` with ``axes`` as an input (opset 18;
  legacy: ``GlobalAveragePool``);
* ``split([h, h])`` gives ``Split`` with the sizes as an initializer (legacy: a ``Constant``
  node); ``chunk(2)`` also gives ``Split`` (legacy: ``Shape -> Gather -> Div -> Slice``), so the
  folded Shape-computed Slice is a legacy-only path;
* activations are named after aten ops (``relu``, ``getitem``...), weights keep torch's names.

With ``optimize=False`` the raw graph is rougher: a bias-less Conv reads
``Expand(CastLike(0, x), Shape(W)[0:1])`` as its bias and ``chunk`` becomes
``SplitToSequence -> SequenceAt``. Those have no provable channel mapping: the groups they touch
are frozen with the op named, the rest is still pruned and masked-equivalent (no crash, no silent
mis-prune) — ``test_unoptimized_dynamo_graph_freezes_with_reasons``.

The dynamo exporter costs ~2.5 s CPU per model (plus a one-off ~4 s warm-up), so three cases run
in the fast suite and the rest are ``slow``.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch

from onnx_compress.prune import list_groups, masked_reference, prune
from tests.numerics import assert_parity
from tests.test_pruning import (
    C2f,
    BasicBlock,
    Chain,
    DenseBlock,
    FlattenHead,
    InvertedResidual,
    PoolHead,
    REL_TOL,
    ResNeXtBlock,
    SHAPE,
    ShuffleBlock,
    TinyUNet,
    check_pruned,
    conv_attr,
    export,
    weights,
)


def _resnet18():
    from benchmarks.models import build_resnet

    return build_resnet("resnet18", width=8, num_classes=10)


#: name -> (factory, input shape, in the fast suite)
MODELS = {
    "chain": (Chain, SHAPE, True),
    "basic_block": (BasicBlock, SHAPE, False),  # also in test_pruning.py's fast suite
    "dense": (DenseBlock, SHAPE, False),
    "inverted_residual": (InvertedResidual, SHAPE, False),
    "resnext": (ResNeXtBlock, SHAPE, False),
    "unet": (TinyUNet, SHAPE, False),
    "flatten_head": (FlattenHead, SHAPE, False),
    "pool_head": (PoolHead, SHAPE, False),
    "c2f": (C2f, SHAPE, False),
    "c2f_chunk": (lambda: C2f(chunk=True), SHAPE, True),
    "shuffle": (ShuffleBlock, SHAPE, True),
    "resnet18": (_resnet18, (1, 3, 32, 32), False),
}


def _param(name: str):
    return pytest.param(name, id=name, marks=() if MODELS[name][2] else (pytest.mark.slow,))


@pytest.fixture(scope="module")
def dynamo_model():
    """Export each model once per module (the dynamo exporter is the expensive part)."""
    cache: dict[str, onnx.ModelProto] = {}

    def get(name: str) -> onnx.ModelProto:
        if name not in cache:
            factory, shape, _ = MODELS[name]
            cache[name] = export(factory(), shape, dynamo=True)
        return cache[name]

    return get


def _group(report_or_groups, tensor: str, axis: int):
    groups = getattr(report_or_groups, "groups", report_or_groups)
    return next(g for g in groups if any(m.tensor == tensor and m.axis == axis for m in g.members))


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


# ---------------------------------------------------------------------------------------------
# fast suite


def test_chain(dynamo_model):
    model = dynamo_model("chain")
    assert "BatchNormalization" not in _ops(model)  # folded into c1 by the exporter
    pruned, report = check_pruned(model)
    w = weights(pruned)
    assert w["c1.weight"].shape[0] == 24 and w["c2.weight"].shape[1] == 24  # 32 * 0.7 -> 24
    assert w["c2.weight"].shape[0] == 16 and w["c3.weight"].shape[1] == 16  # 24 * 0.7 -> 16
    c2 = next(m for m in _group(report, "c2.weight", 0).members if m.tensor == "c2.weight")
    assert c2.removed == 8
    assert w["c3.weight"].shape[0] == 5  # the graph output keeps its channels


def test_channel_shuffle_is_frozen_with_reason(dynamo_model):
    model = dynamo_model("shuffle")
    assert {"Reshape", "Transpose"} <= _ops(model)
    groups = list_groups(model)
    c1 = _group(groups, "c1.weight", 0)
    assert c1.frozen and any("Reshape" in r for r in c1.reasons), c1.reasons
    c2 = _group(groups, "c2.weight", 0)
    assert c2.frozen and any("Reshape" in r for r in c2.reasons), c2.reasons
    pruned, report = prune(model, 0.3)
    w0, w1 = weights(model), weights(pruned)
    assert w1["c1.weight"].shape == w0["c1.weight"].shape  # never mis-pruned across the shuffle
    assert w1["c2.weight"].shape == w0["c2.weight"].shape
    assert w1["c2b.weight"].shape[0] == 16 and w1["c3.weight"].shape[1] == 16
    onnx.checker.check_model(pruned, full_check=True)
    assert_parity(masked_reference(model, report.plan), pruned, rel_tol=REL_TOL)


def test_c2f_chunk_exports_split(dynamo_model):
    model = dynamo_model("c2f_chunk")
    # dynamo turns chunk() into a Split with constant sizes (legacy: Shape-computed Slice)
    assert "Split" in _ops(model) and not {"Shape", "Slice"} & _ops(model)
    _check_c2f(model)


def test_castlike_expand_bias_regression():
    """The raw dynamo bias of a bias-less Conv, ``Expand(CastLike(0, r), [C])``, hand-built (no
    exporter, fast). ``CastLike``'s ``like`` operand carries only a type, and the Expand axis created
    from the scalar is pruned by shrinking its constant target entry; both used to freeze."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (16, 3, 1, 1)), ("w2", (8, 16, 3, 3)), ("w3", (4, 8, 1, 1)))]
    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
              numpy_helper.from_array(np.array([8], np.int64), "target")]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu1"),
        helper.make_node("CastLike", ["zero", "r"], ["zero_like"], name="castlike"),
        helper.make_node("Expand", ["zero_like", "target"], ["bias"], name="expand"),
        helper.make_node("Conv", ["r", "w2", "bias"], ["b"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("HardSigmoid", ["b"], ["h"], name="hsig"),  # f(0) != 0: masking is exact only at c3
        helper.make_node("Conv", ["h", "w3"], ["y"], name="c3"),
    ]
    graph = helper.make_graph(nodes, "castlike_bias",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    pruned, report = check_pruned(model, 0.5, round_to=1)
    assert [g.kept for g in report.groups if not g.frozen] and not any(
        "CastLike" in r or "Expand" in r for g in report.groups for r in g.reasons)
    w = weights(pruned)
    assert w["w1"].shape[0] == 8 and w["w2"].shape == (4, 8, 3, 3) and w["w3"].shape[1] == 4
    expand = next(n for n in pruned.graph.node if n.op_type == "Expand")
    assert [int(v) for v in w[expand.input[1]]] == [4]  # the target entry follows the kept count


# ---------------------------------------------------------------------------------------------
# slow: the rest of the architectures


def _check_c2f(model: onnx.ModelProto) -> None:
    pruned, report = check_pruned(model)
    w = weights(pruned)
    split = next(n for n in pruned.graph.node if n.op_type == "Split")
    assert [int(v) for v in w[split.input[1]]] == [8, 8]  # 16 * 0.7 = 11.2 -> 8 per half
    assert w["cv1.weight"].shape[0] == 16
    assert w["m.weight"].shape[1] == 8
    assert w["cv2.weight"].shape[1] == 8 + 8 + w["m.weight"].shape[0]
    halves = [g for g in report.groups if any(m.tensor == "cv1.weight" and m.axis == 0 for m in g.members)]
    assert len(halves) == 2 and all(g.channels == 16 and not g.frozen for g in halves)
    _, report1 = prune(model, 0.3, round_to=1)  # without rounding: 16 * 0.7 = 11.2 -> 11
    assert all(g.kept == 11 for g in report1.groups if g.id in {h.id for h in halves})


@pytest.mark.slow
def test_c2f_split_concat(dynamo_model):
    _check_c2f(dynamo_model("c2f"))


@pytest.mark.slow
def test_residual_block_prunes_the_stream_as_one_group(dynamo_model):
    model = dynamo_model("basic_block")
    assert "BatchNormalization" not in _ops(model)
    pruned, report = check_pruned(model)
    w = weights(pruned)
    assert w["stem.weight"].shape[0] == w["c2.weight"].shape[0] == w["head.weight"].shape[1] == 24
    assert w["c1.weight"].shape == (24, 24, 3, 3)
    stream = _group(report, "stem.weight", 0)
    assert any(m.tensor == "c2.weight" and m.axis == 0 for m in stream.members)
    # the exporter's folded BN bias takes bn2's place in the stream group
    assert any(m.tensor == "c2.weight_bias" for m in stream.members)
    assert w["c2.weight_bias"].shape == (24,)


@pytest.mark.slow
def test_dense_concat_block(dynamo_model):
    pruned, _ = check_pruned(dynamo_model("dense"))
    w = weights(pruned)
    assert w["out.weight"].shape[1] == w["stem.weight"].shape[0] + w["l1.weight"].shape[0] + w["l2.weight"].shape[0]
    assert w["l2.weight"].shape[1] == w["stem.weight"].shape[0] + w["l1.weight"].shape[0]
    assert w["stem.weight"].shape[0] < 16


@pytest.mark.slow
def test_depthwise_separable_inverted_residual(dynamo_model):
    model = dynamo_model("inverted_residual")
    assert "BatchNormalization" not in _ops(model) and "Clip" in _ops(model)  # relu6 -> Clip
    pruned, _ = check_pruned(model)
    w = weights(pruned)
    assert w["expand.weight"].shape[0] == 32  # 48 * 0.7 = 33.6 -> 32
    assert w["dw.weight"].shape == (32, 1, 3, 3)
    assert conv_attr(pruned, "dw.weight", "group") == 32
    assert w["project.weight"].shape[1] == 32


@pytest.mark.slow
def test_grouped_conv_removes_whole_groups(dynamo_model):
    pruned, _ = check_pruned(dynamo_model("resnext"))
    w = weights(pruned)
    assert conv_attr(pruned, "grouped.weight", "group") == 6  # 8 groups * 0.7 -> 6 whole groups
    assert w["grouped.weight"].shape == (24, 4, 3, 3)
    assert w["reduce.weight"].shape[0] == 24 and w["expand.weight"].shape[1] == 24


@pytest.mark.slow
def test_unet_conv_transpose_and_concat_skip(dynamo_model):
    pruned, _ = check_pruned(dynamo_model("unet"))
    w = weights(pruned)
    assert w["up.weight"].shape[0] == w["down.weight"].shape[0] == 24
    assert w["up.bias"].shape[0] == w["up.weight"].shape[1]
    assert w["dec.weight"].shape[1] == w["up.weight"].shape[1] + w["enc.weight"].shape[0]


@pytest.mark.slow
def test_reshape_into_gemm_maps_whole_spatial_blocks(dynamo_model):
    model = dynamo_model("flatten_head")
    assert "Reshape" in _ops(model) and "Flatten" not in _ops(model)
    pruned, report = check_pruned(model)
    w = weights(pruned)
    kept = w["c2.weight"].shape[0]
    assert kept < 16
    assert w["fc1.weight"].shape == (24, kept * 16)
    member = next(m for m in _group(report, "fc1.weight", 1).members if m.tensor == "fc1.weight")
    assert member.removed == (16 - kept) * 16
    # the Reshape's shape constant now yields C_kept * H * W features
    reshape = next(n for n in pruned.graph.node if n.op_type == "Reshape")
    target = [int(v) for v in w[reshape.input[1]]]
    assert target[-1] in (kept * 16, -1) and target[-1] != 16 * 16, target


@pytest.mark.slow
def test_reduce_mean_pool_reshape_gemm(dynamo_model):
    model = dynamo_model("pool_head")
    assert "ReduceMean" in _ops(model) and "GlobalAveragePool" not in _ops(model)
    pruned, _ = check_pruned(model)
    assert weights(pruned)["fc.weight"].shape == (5, 16)


@pytest.mark.slow
def test_small_resnet18(dynamo_model):
    model = dynamo_model("resnet18")
    pruned, report = check_pruned(model)
    w = weights(pruned)
    frozen = [g for g in report.groups if g.frozen]
    # only the image channels and the logits are frozen, by the graph input / output
    assert len(frozen) == 2 and all(any("graph" in r for r in g.reasons) for g in frozen)
    # each stage's residual stream is one group: stem, every conv2 and downsample agree
    kept1 = w["conv1.weight"].shape[0]
    assert w["layer1.0.conv2.weight"].shape[0] == w["layer1.1.conv2.weight"].shape[0] == kept1
    assert w["layer2.0.downsample.0.weight"].shape[1] == kept1
    kept4 = w["layer4.0.downsample.0.weight"].shape[0]
    assert w["layer4.1.conv2.weight"].shape[0] == kept4 == w["fc.weight"].shape[1] < 64


# ---------------------------------------------------------------------------------------------
# ratio 0 and the unoptimised export


@pytest.mark.parametrize("name", [_param(n) for n in MODELS])
def test_ratio_zero_is_bit_identical(dynamo_model, name):
    model = dynamo_model(name)
    pruned, report = prune(model, 0.0)
    assert not report.plan
    before, after = weights(model), weights(pruned)
    assert before.keys() == after.keys()
    for key, v in before.items():
        assert after[key].shape == v.shape and after[key].tobytes() == v.tobytes(), key
    assert report.macs_after == report.macs_before


def _export_unoptimized(module: torch.nn.Module) -> onnx.ModelProto:
    module.eval()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (torch.randn(*SHAPE),), dynamo=True, external_data=False,
                                    opset_version=18, optimize=False, input_names=["x"],
                                    output_names=["y"], verbose=False)
    return program.model_proto


@pytest.mark.slow
@pytest.mark.parametrize("factory", [Chain, BasicBlock, InvertedResidual], ids=["chain", "basic_block", "inverted_residual"])
def test_unoptimized_dynamo_graph_keeps_batchnorm_and_prunes(factory):
    """Raw dynamo graph: BN is not folded and a bias-less Conv reads ``Expand(CastLike(0, x),
    Shape(W)[0:1])`` as its bias. Regression for two rules.py fixes: ``CastLike``'s ``like`` operand
    carries only a type (it used to freeze the producer's group: "no channel rule for CastLike"),
    and an Expand axis created from a broadcast input with a constant target entry is pruned by
    shrinking that entry (it used to freeze the Conv's group: "axis 0 is created by Expand")."""
    model = _export_unoptimized(factory())
    assert {"BatchNormalization", "CastLike", "Expand"} <= _ops(model)
    pruned, report = check_pruned(model)  # masked equivalence with the BN parameters sliced
    frozen = [g for g in report.groups if g.frozen]
    assert len(frozen) == 2 and all(any("graph" in r for r in g.reasons) for g in frozen), \
        [g.reasons for g in frozen]
    w = weights(pruned)
    first_bn = next(n for n in pruned.graph.node if n.op_type == "BatchNormalization")
    conv = next(n for n in pruned.graph.node if n.op_type == "Conv" and n.output[0] == first_bn.input[0])
    conv_out = w[conv.input[1]].shape[0]
    assert all(w[t].shape == (conv_out,) for t in first_bn.input[1:]), "BN parameters not sliced with the Conv"
    original = weights(model)[conv.input[1]].shape[0]
    assert conv_out == round(original * 0.7 / 8) * 8 < original  # the legacy test's kept counts


@pytest.mark.slow
def test_unoptimized_chunk_is_frozen_with_reason():
    """Raw dynamo ``chunk``: ``SplitToSequence -> SequenceAt`` has no channel rule, so exactly the
    groups through it are frozen with the op named; no crash, no silent mis-prune."""
    model = _export_unoptimized(C2f(chunk=True))
    assert "SplitToSequence" in _ops(model)
    pruned, report = prune(model, 0.3)
    onnx.checker.check_model(pruned, full_check=True)
    for g in report.groups:
        if g.frozen:  # every frozen group says why and keeps every channel in every member
            assert g.reasons and g.kept == g.channels and all(m.removed == 0 for m in g.members)
    cv1 = _group(report, "cv1.weight", 0)
    assert cv1.frozen and any("SplitToSequence" in r for r in cv1.reasons), cv1.reasons
    assert weights(pruned)["m.weight"].shape[0] == 8  # the bottleneck's own outputs are still pruned
    assert_parity(masked_reference(model, report.plan), pruned, rel_tol=REL_TOL, samples=2)
