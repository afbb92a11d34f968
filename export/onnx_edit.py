"""Small in-place edits of an ``onnx.ModelProto`` that the runtime encodings share."""
from __future__ import annotations

import contextlib
import logging

import numpy as np

from edgebuild.export.base import ExportError

MS = "com.microsoft"


@contextlib.contextmanager
def quiet(*loggers: str, level: int = logging.WARNING):
    """Raise the level of chatty library loggers for the duration of the block."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in saved:
            logger.setLevel(old)


def node(model, name: str):
    """The node called ``name``; ``ExportError`` when the graph has none."""
    for n in model.graph.node:
        if n.name == name:
            return n
    raise ExportError(f"the runtime graph has no node {name!r}; the graph builder changed its layout")


def producer(model, value: str):
    """The node whose output is ``value``, or None (a graph input or an initializer)."""
    return next((n for n in model.graph.node if value in n.output), None)


def initializer(model, name: str):
    return next((t for t in model.graph.initializer if t.name == name), None)


def array(model, name: str) -> np.ndarray:
    """The value of initializer ``name`` (its data must be loaded)."""
    from onnx import numpy_helper

    tensor = initializer(model, name)
    if tensor is None:
        raise ExportError(f"the runtime graph has no initializer {name!r}")
    return numpy_helper.to_array(tensor)


def add_initializer(model, name: str, value: np.ndarray) -> None:
    from onnx import numpy_helper

    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))


def embedding_table(model, gather: str, head: str | None) -> tuple:
    """``(table [V, H] float32, tied)`` of the embedding ``Gather``; ``tied`` when its data is the
    transpose of the head ``MatMul``'s weight (onnxruntime-genai's float layout of tied embeddings)."""
    data = node(model, gather).input[0]
    source = producer(model, data)
    if source is None:
        return array(model, data).astype(np.float32), False
    if source.op_type != "Transpose" or head is None or node(model, head).input[1] != source.input[0]:
        raise ExportError(f"the embedding {gather!r} reads {data!r} from a {source.op_type} node; "
                          f"only an initializer or the transposed output head is understood")
    return array(model, source.input[0]).T.astype(np.float32), True


def reshape_initializer(model, name: str, shape: list, out: str) -> str:
    """Add ``out = Reshape(name, shape)``; return ``out``."""
    from onnx import helper

    shape_name = f"{out}.shape"
    add_initializer(model, shape_name, np.asarray(shape, dtype=np.int64))
    model.graph.node.append(helper.make_node("Reshape", [name, shape_name], [out], name=f"/{out}/Reshape"))
    return out


def replace_gather(model, gather: str, data: str, quant: list, *, bits: int, block_size: int) -> None:
    """Turn ``Gather(table, ids)`` into ``GatherBlockQuantized(data, ids, scales[, zero_points])``."""
    from onnx import helper

    old = node(model, gather)
    new = helper.make_node("GatherBlockQuantized", [data, old.input[1], *quant], list(old.output),
                           name=old.name.replace("/Gather", "/GatherBlockQuantized"), domain=MS,
                           bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1)
    _swap(model, old, new)


def replace_matmul(model, matmul: str, quant: list, *, K: int, N: int, bits: int, block_size: int,
                   accuracy_level: int) -> None:
    """Turn ``MatMul(x, W)`` into ``MatMulNBits(x, packed, scales[, zero_points])``."""
    from onnx import helper

    old = node(model, matmul)
    attrs = dict(K=K, N=N, bits=bits, block_size=block_size)
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    new = helper.make_node("MatMulNBits", [old.input[0], *quant], list(old.output),
                           name=f"{old.name}_Q{bits}", domain=MS, **attrs)
    _swap(model, old, new)


def _swap(model, old, new) -> None:
    nodes = list(model.graph.node)
    nodes[nodes.index(old)] = new
    model.graph.ClearField("node")
    model.graph.node.extend(_topological(nodes))
    if not any(op.domain == MS for op in model.opset_import):
        model.opset_import.append(__import__("onnx").helper.make_opsetid(MS, 1))


def _topological(nodes: list) -> list:
    """``nodes`` ordered so that every node follows the producers of its inputs."""
    produced = {out: i for i, n in enumerate(nodes) for out in n.output}
    order, state = [], {}

    def visit(i):
        if state.get(i) == 2:
            return
        state[i] = 1
        for value in nodes[i].input:
            j = produced.get(value)
            if j is not None and state.get(j) != 1:
                visit(j)
        state[i] = 2
        order.append(nodes[i])

    for i in range(len(nodes)):
        visit(i)
    return order


def drop_unused(model) -> None:
    """Remove nodes whose outputs nothing reads, then initializers nothing reads (repeatedly)."""
    outputs = {o.name for o in model.graph.output}
    while True:
        used = {v for n in model.graph.node for v in n.input} | outputs
        dead = [n for n in model.graph.node if not any(o in used for o in n.output)]
        for n in dead:
            model.graph.node.remove(n)
        if not dead:
            break
    used = {v for n in model.graph.node for v in n.input}
    for tensor in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(tensor)
