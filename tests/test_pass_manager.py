"""PassManager (DESIGN.md convention 1): runs passes in order up to ``steps`` times, stops at a fixed
point when ``early_stop``, and on failure raises PassError naming the failing pass and the passes
that ran before it; rewrite rules report why they declined; every pass works on a ModelProto too."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from onnx_compress.ir.errors import InvalidModelError, PassError
from onnx_compress.ir.graph import to_graph
from onnx_compress.passes.base import Match, Pass, PassManager, PassResult, RewriteRule, RewriteRulePass
from onnx_compress.passes.eliminate_noop import EliminateNoOpPass


def _chain(n: int) -> onnx.ModelProto:
    """x -> Identity x n -> Relu -> y"""
    nodes, prev = [], "x"
    for i in range(n):
        nodes.append(helper.make_node("Identity", [prev], [f"i{i}"], name=f"id{i}"))
        prev = f"i{i}"
    nodes.append(helper.make_node("Relu", [prev], ["y"], name="relu"))
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


class _RemoveOneIdentity(Pass):
    """Removes at most one Identity per call: needs several steps to reach the fixed point."""

    name = "remove-one-identity"

    def __init__(self):
        self.calls = 0

    def call(self, graph):
        self.calls += 1
        for node in graph.nodes:
            if node.op == "Identity":
                src, dst = node.inputs[0], node.outputs[0]
                for user in list(dst.outputs):
                    user.inputs[user.inputs.index(dst)] = src
                node.outputs.clear()
                graph.cleanup()
                return PassResult(graph, True, 1)
        return PassResult(graph, False, 0)


class _Count(Pass):
    def __init__(self, name):
        self.name = name
        self.calls = 0

    def call(self, graph):
        self.calls += 1
        return PassResult(graph, False, 0)


class _Boom(Pass):
    name = "boom"

    def call(self, graph):
        raise ZeroDivisionError("division by zero\nsecond line of detail")


def _identities(graph: gs.Graph) -> int:
    return sum(n.op == "Identity" for n in graph.nodes)


def test_runs_to_fixed_point_and_stops_early():
    graph = to_graph(_chain(3))
    remover, counter = _RemoveOneIdentity(), _Count("count")
    result = PassManager([remover, counter], steps=10).call(graph)
    assert _identities(result.graph) == 0
    assert result.modified and result.changes == 3
    # three changing steps, then one step that changes nothing, then it stops
    assert remover.calls == 4 and counter.calls == 4


def test_steps_bound_the_iterations():
    graph = to_graph(_chain(5))
    remover = _RemoveOneIdentity()
    result = PassManager([remover], steps=2).call(graph)
    assert remover.calls == 2
    assert _identities(result.graph) == 3 and result.changes == 2


def test_without_early_stop_all_steps_run():
    remover = _RemoveOneIdentity()
    result = PassManager([remover], steps=6, early_stop=False).call(to_graph(_chain(2)))
    assert remover.calls == 6
    assert result.changes == 2 and result.modified


def test_nothing_to_do_is_not_modified():
    counter = _Count("count")
    result = PassManager([counter], steps=5).call(to_graph(_chain(0)))
    assert not result.modified and result.changes == 0 and counter.calls == 1


def test_steps_must_be_positive():
    with pytest.raises(ValueError):
        PassManager([], steps=0)


def test_pass_error_names_the_failing_pass_and_those_before():
    manager = PassManager([_Count("first"), _Count("second"), _Boom(), _Count("after")], steps=3)
    with pytest.raises(PassError) as info:
        manager.call(to_graph(_chain(1)))
    message = str(info.value)
    assert "pass 'boom' failed" in message
    assert "ZeroDivisionError: division by zero" in message
    assert "passes before it: first, second" in message
    assert "after" not in message and "\n" not in message
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_pass_error_of_the_first_pass_says_none_before():
    with pytest.raises(PassError, match="passes before it: none"):
        PassManager([_Boom()]).call(to_graph(_chain(1)))


def test_our_own_errors_are_wrapped_with_context():
    class _Invalid(Pass):
        name = "invalid"

        def call(self, graph):
            raise InvalidModelError("tensor 'w' has no shape")

    with pytest.raises(PassError, match="pass 'invalid' failed .*tensor 'w' has no shape.*before it: count") as info:
        PassManager([_Count("count"), _Invalid()]).call(to_graph(_chain(1)))
    assert isinstance(info.value.__cause__, InvalidModelError)


def test_pass_error_from_a_nested_manager_is_not_rewrapped():
    inner = PassManager([_Count("inner-first"), _Boom()])

    class _Nested(Pass):
        name = "nested"

        def call(self, graph):
            return inner.call(graph)

    with pytest.raises(PassError) as info:
        PassManager([_Nested()]).call(to_graph(_chain(1)))
    assert str(info.value).startswith("pass 'boom' failed")
    assert "inner-first" in str(info.value)


def test_manager_and_passes_accept_modelproto_and_return_modelproto():
    model = _chain(2)
    before = model.SerializeToString()
    out = PassManager([EliminateNoOpPass()], steps=2)(model)
    assert isinstance(out, onnx.ModelProto)
    assert [n.op_type for n in out.graph.node] == ["Relu"]
    assert [o.name for o in out.graph.output] == ["y"]
    assert model.SerializeToString() == before  # the input model is not mutated
    single = EliminateNoOpPass()(model)
    assert isinstance(single, onnx.ModelProto) and [n.op_type for n in single.graph.node] == ["Relu"]
    graph_out = EliminateNoOpPass()(to_graph(model))
    assert isinstance(graph_out, gs.Graph)
    with pytest.raises(TypeError):
        EliminateNoOpPass()("not a model")


class _DoubleRelu(RewriteRule):
    """Relu(Relu(x)) -> Relu(x), declining when the inner Relu is named 'keep'."""

    def match(self, graph, node):
        if node.op != "Relu" or not node.inputs[0].inputs or node.inputs[0].inputs[0].op != "Relu":
            return None
        return Match(node, {"inner": node.inputs[0].inputs[0]})

    def check(self, graph, match):
        return "inner Relu is protected" if match["inner"].name == "keep" else None

    def rewrite(self, graph, match):
        match.anchor.inputs[0] = match["inner"].inputs[0]


class _DoubleReluPass(RewriteRulePass):
    name = "double-relu"
    rules = (_DoubleRelu(),)


def _double_relu(inner_name: str) -> gs.Graph:
    x = gs.Variable("x", dtype=np.float32, shape=(2,))
    mid = gs.Variable("mid", dtype=np.float32, shape=(2,))
    y = gs.Variable("y", dtype=np.float32, shape=(2,))
    nodes = [gs.Node("Relu", inner_name, inputs=[x], outputs=[mid]), gs.Node("Relu", "outer", inputs=[mid], outputs=[y])]
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=13)


def test_rewrite_rule_pass_applies_and_reports_declines():
    result = _DoubleReluPass().call(_double_relu("inner"))
    assert result.modified and result.changes == 1 and result.declined == []
    assert [n.name for n in result.graph.nodes] == ["outer"]

    declined = _DoubleReluPass().call(_double_relu("keep"))
    assert not declined.modified and declined.changes == 0
    assert declined.declined == [("outer", "inner Relu is protected")]
    assert len(declined.graph.nodes) == 2


def test_manager_collects_declines_and_history():
    manager = PassManager([_DoubleReluPass(), _Count("count")], steps=3)
    result = manager.call(_double_relu("keep"))
    assert result.declined == [("outer", "inner Relu is protected")]
    assert [label for label, _ in manager.history] == ["double-relu", "count"]
