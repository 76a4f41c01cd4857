"""Small helpers shared by the passes that rewrite an exported ONNX graph in place."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def read_names(node: onnx.NodeProto) -> list[str]:
    """What ``node`` reads, including outer-scope names read inside its subgraphs (the If
    branches of a token-reduced export)."""
    names = list(node.input)
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            names += [name for inner in sub.node for name in read_names(inner)]
            names += [out.name for out in sub.output]
    return names


class GraphIndex:
    """Producers, consumers and constant values of an ONNX graph's tensors."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in set(read_names(node)):
                self.consumers[name].append(node)
        self.initializers = {init.name: init for init in graph.initializer}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Identity":  # the exporter's shared copies of equal constants
            return self.const(node.input[0])
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def made_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_consumer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def other_input(self, node: onnx.NodeProto, name: str) -> np.ndarray | None:
        others = [i for i in node.input if i != name]
        return self.const(others[0]) if len(others) == 1 else None


def drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads (chains a rewrite replaced), then initializers
    nothing reads (names read inside If branches count)."""
    while True:
        used = {name for node in graph.node for name in read_names(node)} | {out.name for out in graph.output}
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def use_contrib_domain(model: onnx.ModelProto) -> None:
    """Declare ONNX Runtime's ``com.microsoft`` operator domain (its contrib kernels)."""
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


# A rewrite's match: for a node, None or (the new node, its new initializers, the nodes it replaces).
Match = Callable[[GraphIndex, onnx.NodeProto], tuple[onnx.NodeProto, list[onnx.TensorProto], list] | None]


def rewrite_nodes(path: str | Path, op_types: Collection[str], match: Match) -> int:
    """In the ONNX file at ``path``, in place: for each node of ``op_types`` that ``match``
    rewrites, put the new node where the last replaced one was, then drop what nothing reads
    and declare the contrib domain. Returns how many were rewritten (0: the file is untouched)."""
    model = onnx.load(str(path))
    graph = model.graph
    g = GraphIndex(graph)
    rewritten = 0
    for node in [n for n in graph.node if n.op_type in op_types]:
        found = match(g, node)
        if found is None:
            continue
        new, inits, replaced = found
        graph.node.insert(list(graph.node).index(replaced[-1]), new)
        for old in replaced:
            graph.node.remove(old)
        graph.initializer.extend(inits)
        rewritten += 1
    if rewritten:
        drop_unused(graph)
        use_contrib_domain(model)
        onnx.save(model, str(path))
    return rewritten
