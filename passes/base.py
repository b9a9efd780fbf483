"""The pass contract, rewrite rules, and the PassManager.

A pass is an object with ``call(graph) -> PassResult(graph, modified)`` working on a
graphsurgeon ``gs.Graph`` (in place, returning it). ``modified`` is true only if something
changed, which is what lets :class:`PassManager` run a list of passes to a fixed point. Calling a
pass object directly (``FoldBatchNormPass()(x)``) accepts a ``gs.Graph`` *or* an
``onnx.ModelProto`` and returns the same kind, so every pass is usable alone.

Rewrites that match a local pattern are written as :class:`RewriteRule` with three steps (after
onnxscript's rewriter): ``match`` finds a candidate anchored at one node, ``check`` returns a
human-readable reason when it declines (``"weight is a graph input"``), and ``rewrite`` changes
the graph. A declined match leaves the graph untouched; the reasons are kept in
``PassResult.declined`` so reports can say why a BatchNormalization was not folded.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import onnx
import onnx_graphsurgeon as gs

from ..ir.errors import OnnxCompressError, PassError
from ..ir.graph import to_graph, to_model

logger = logging.getLogger(__name__)


@dataclass
class PassResult:
    graph: gs.Graph
    modified: bool
    #: number of rewrites/removals the pass made (for reports)
    changes: int = 0
    #: (node name, reason) for every candidate a rule declined
    declined: list[tuple[str, str]] = field(default_factory=list)


class Pass(abc.ABC):
    """Base class: subclasses implement :meth:`call`."""

    #: short name used on the command line (``--passes fold-batchnorm``)
    name: ClassVar[str] = ""

    @abc.abstractmethod
    def call(self, graph: gs.Graph) -> PassResult:
        """Transform ``graph`` in place and say whether anything changed."""

    def __call__(self, model_or_graph: Any) -> Any:
        if isinstance(model_or_graph, onnx.ModelProto):
            graph = to_graph(model_or_graph)
            result = self.call(graph)
            return to_model(result.graph, like=model_or_graph)
        if isinstance(model_or_graph, gs.Graph):
            return self.call(model_or_graph).graph
        raise TypeError(f"{type(self).__name__} expects a gs.Graph or onnx.ModelProto")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass
class Match:
    """What a rule matched: the anchor node and any named parts the rule wants to keep."""

    anchor: gs.Node
    parts: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.parts[key]


class RewriteRule(abc.ABC):
    """pattern / check / rewrite."""

    @abc.abstractmethod
    def match(self, graph: gs.Graph, node: gs.Node) -> Match | None:
        """A candidate anchored at ``node``, or None if the pattern does not apply."""

    def check(self, graph: gs.Graph, match: Match) -> str | None:
        """None to go ahead, or the reason for declining."""
        return None

    @abc.abstractmethod
    def rewrite(self, graph: gs.Graph, match: Match) -> None:
        """Change the graph. Called only after ``check`` returned None."""


class RewriteRulePass(Pass):
    """Applies a list of rewrite rules to every node once per call; cleans up after itself."""

    rules: Sequence[RewriteRule] = ()

    def call(self, graph: gs.Graph) -> PassResult:
        changes = 0
        declined: list[tuple[str, str]] = []
        for rule in self.rules:
            for node in list(graph.nodes):
                if not _still_in_graph(node):
                    continue
                match = rule.match(graph, node)
                if match is None:
                    continue
                reason = rule.check(graph, match)
                if reason is not None:
                    declined.append((node.name or node.op, reason))
                    logger.debug("%s declined %s: %s", type(rule).__name__, node.name, reason)
                    continue
                rule.rewrite(graph, match)
                changes += 1
        if changes:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, changes > 0, changes, declined)


def _still_in_graph(node: gs.Node) -> bool:
    # A node removed by an earlier rewrite has been disconnected from its outputs.
    return bool(node.outputs) or bool(node.inputs)


class PassManager:
    """Runs ``passes`` in order, up to ``steps`` times, stopping early at a fixed point.

    On failure raises :class:`PassError` naming the pass and the passes that ran before it.
    """

    def __init__(self, passes: Iterable[Pass], *, steps: int = 1, early_stop: bool = True):
        self.passes = list(passes)
        if steps < 1:
            raise ValueError("steps must be at least 1")
        self.steps = steps
        self.early_stop = early_stop

    def call(self, graph: gs.Graph) -> PassResult:
        results: list[tuple[str, PassResult]] = []
        ran: list[str] = []
        any_change = False
        for step in range(self.steps):
            step_change = False
            for p in self.passes:
                label = p.name or type(p).__name__
                try:
                    result = p.call(graph)
                except OnnxCompressError as exc:
                    if isinstance(exc, PassError):
                        raise
                    raise PassError(_failure(label, ran, exc)) from exc
                except Exception as exc:
                    raise PassError(_failure(label, ran, exc)) from exc
                ran.append(label)
                graph = result.graph
                results.append((label, result))
                step_change |= result.modified
            any_change |= step_change
            if self.early_stop and not step_change:
                break
        self.history = results
        total = sum(r.changes for _, r in results)
        declined = [d for _, r in results for d in r.declined]
        return PassResult(graph, any_change, total, declined)

    def __call__(self, model_or_graph: Any) -> Any:
        if isinstance(model_or_graph, onnx.ModelProto):
            graph = to_graph(model_or_graph)
            return to_model(self.call(graph).graph, like=model_or_graph)
        return self.call(model_or_graph).graph


def _failure(label: str, ran: list[str], exc: BaseException) -> str:
    before = ", ".join(dict.fromkeys(ran)) or "none"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"pass '{label}' failed ({type(exc).__name__}: {first}); passes before it: {before}"
