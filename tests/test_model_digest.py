"""``model_digest``: what a model computes, whatever its values and nodes are named."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compressor.model_digest import model_digest
from compressor.model_io import clone_model
from tests.ortutil import model_from_text

TEXT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4] x) => (float[1,4] y) {{
  [mm] h = MatMul(x, w)
  [act] r = {act}(h)
  [dead] unused = Neg(r)
  [add] y = Add(r, b)
}}"""


def net(act: str = "Relu", w: float = 0.5) -> ir.Model:
    return model_from_text(TEXT.format(act=act), w=np.full((4, 4), w, np.float32), b=np.arange(4, dtype=np.float32))


def renamed(model: ir.Model) -> ir.Model:
    """Every node and every value but the graph's inputs and outputs renamed, the nodes reversed."""
    copy = clone_model(model)
    graph = copy.graph
    for node in graph:
        node.name = f"n_{node.name}"
        for out in node.outputs:
            if not out.is_graph_output():
                out.name = f"v_{out.name}"
    for value in list(graph.initializers.values()):
        graph.initializers.pop(value.name)
        value.name = f"i_{value.name}"
        graph.initializers[value.name] = value
    nodes = list(graph)
    for node in nodes:
        graph.remove(node)
    graph.extend(reversed(nodes))
    return copy


def test_names_node_order_and_dead_nodes_do_not_count():
    model = net()
    assert model_digest(renamed(model)) == model_digest(model)
    without_dead = clone_model(model)
    dead = next(n for n in without_dead.graph if n.name == "dead")
    without_dead.graph.remove(dead, safe=True)
    assert model_digest(without_dead) == model_digest(model)


def test_an_op_a_constant_or_an_attribute_that_differs_does():
    model = net()
    assert model_digest(net(act="Sigmoid")) != model_digest(model)
    assert model_digest(net(w=0.5 + 1e-6)) != model_digest(model)
    with_attribute = clone_model(model)
    next(n for n in with_attribute.graph if n.name == "act").attributes["alpha"] = ir.AttrFloat32("alpha", 0.1)
    assert model_digest(with_attribute) != model_digest(model)
    swapped = clone_model(model)
    add = next(n for n in swapped.graph if n.name == "add")
    a, b = add.inputs
    add.replace_input_with(0, b)
    add.replace_input_with(1, a)
    assert model_digest(swapped) != model_digest(model), "the inputs' order counts"
