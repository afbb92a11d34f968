"""The float weights a runtime directory makes the device execute, read back from its graph.

``deployed_state_dict(runtime_dir)`` dequantises every weight exactly as onnxruntime's kernels do
(``MatMulNBits`` and ``GatherBlockQuantized``: ``(code - zero_point) * scale`` in float32 per
block; float ``MatMul``/``Gather`` weights as stored) and names them as the model's state dict,
using the map ``runtime.json`` recorded when the stage was encoded. ``deployed_model`` loads them
into a copy of a torch model, so the host can evaluate exactly what the device runs.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from edgebuild.device_agent import runtime_dir
from edgebuild.export import onnx_edit
from edgebuild.export.base import ExportError


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _unpack_zero_points(zeros: np.ndarray, rows: int, blocks: int, bits: int) -> np.ndarray:
    zeros = zeros.reshape(rows, -1)
    if bits == 4:
        zeros = np.stack([zeros & 0x0F, zeros >> 4], axis=-1).reshape(rows, -1)
    return zeros[:, :blocks].astype(np.float32)


def dequantize_blockwise(packed, scales, zeros, *, rows: int, cols: int, bits: int, block_size: int) -> np.ndarray:
    """``(rows, cols)`` float32 of blockwise codes in MatMulNBits' layout (``rows`` = N outputs,
    ``cols`` = K inputs; blocks of ``block_size`` along K; 4-bit codes low nibble first)."""
    blocks = -(-cols // block_size)
    codes = np.asarray(packed, dtype=np.uint8).reshape(rows, blocks, -1)
    if bits == 4:
        codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(rows, blocks, -1)
    elif bits != 8:
        raise ExportError(f"{bits}-bit blockwise weights are not supported")
    codes = codes[:, :, :block_size].astype(np.float32)
    scale = np.asarray(scales, dtype=np.float32).reshape(rows, blocks)
    if zeros is None:
        zero = np.full((rows, blocks), float(1 << (bits - 1)), dtype=np.float32)
    elif np.asarray(zeros).dtype == np.uint8:
        zero = _unpack_zero_points(np.asarray(zeros), rows, blocks, bits)
    else:
        zero = np.asarray(zeros, dtype=np.float32).reshape(rows, blocks)
    out = (codes - zero[:, :, None]) * scale[:, :, None]
    return out.reshape(rows, blocks * block_size)[:, :cols]


def _source(model, name: str) -> np.ndarray:
    """Value of an initializer, following a ``Reshape``/``Transpose`` of one."""
    tensor = onnx_edit.initializer(model, name)
    if tensor is not None:
        return onnx_edit.array(model, name)
    node = onnx_edit.producer(model, name)
    if node is not None and node.op_type == "Transpose":
        return _source(model, node.input[0]).T
    if node is not None and node.op_type == "Reshape":
        return _source(model, node.input[0])       # the packed bytes keep their order
    raise ExportError(f"the runtime graph computes {name!r} with {getattr(node, 'op_type', None)}; "
                      f"only initializers are understood as weights")


def _optional(model, node, index: int):
    return _source(model, node.input[index]) if len(node.input) > index and node.input[index] else None


def _weight(model, node) -> np.ndarray:
    """The float weight (in torch's layout: [out, in] for a projection, [vocab, hidden] for an
    embedding) that ``node`` multiplies or gathers."""
    kind, attrs = node.op_type, _attrs(node)
    if kind == "MatMul":
        return _source(model, node.input[1]).T
    if kind == "Gather":
        return _source(model, node.input[0])
    if kind == "MatMulNBits":
        return dequantize_blockwise(_source(model, node.input[1]), _source(model, node.input[2]),
                                    _optional(model, node, 3), rows=attrs["N"], cols=attrs["K"],
                                    bits=attrs["bits"], block_size=attrs["block_size"])
    if kind == "GatherBlockQuantized":
        data = _source(model, node.input[0])
        data = data.reshape(data.shape[0], -1)
        cols = data.shape[1] * 8 // attrs["bits"]
        return dequantize_blockwise(data, _source(model, node.input[2]), _optional(model, node, 3),
                                    rows=data.shape[0], cols=cols, bits=attrs["bits"],
                                    block_size=attrs["block_size"])
    raise ExportError(f"the runtime graph uses {kind} ({node.name}) for a weight; no dequantiser knows it")


def graph_weights(model, entries: dict) -> dict:
    """``{state-dict name: float32 array}`` for the map ``entries`` (see ``runtime_graph.tensor_map``)."""
    out, cache = {}, {}
    for name, entry in entries.items():
        if entry["op"] == "initializer":
            out[name] = onnx_edit.array(model, entry["value"]).astype(np.float32)
            continue
        value = entry["value"]
        if value not in cache:
            node = onnx_edit.producer(model, value)
            if node is None:
                raise ExportError(f"the runtime graph has no node computing {value!r} (for {name})")
            cache[value] = _weight(model, node).astype(np.float32)
        weight = cache[value]
        rows = entry.get("rows")
        out[name] = np.ascontiguousarray(weight[rows[0]:rows[1]] if rows else weight)
    return out


def load_graph(folder):
    """The runtime directory's ``onnx.ModelProto`` with its weights, after checking its files."""
    import onnx

    folder = Path(folder)
    manifest = runtime_dir.read_manifest(folder)
    runtime_dir.check_files(folder, manifest, hashes=False)
    return onnx.load(str(folder / runtime_dir.GRAPH), load_external_data=True), manifest


def deployed_state_dict(folder) -> dict:
    """The float32 weights the device executes for the runtime directory ``folder``, by
    state-dict name (a tied output head appears under both of its names)."""
    model, manifest = load_graph(folder)
    return graph_weights(model, manifest["tensors"])


def deployed_model(model, folder):
    """A copy of the torch ``model`` carrying the deployed weights of ``folder``."""
    import torch

    state = deployed_state_dict(folder)
    clone = copy.deepcopy(model)
    targets = clone.state_dict()
    missing = sorted(set(targets) - set(state))
    if missing:
        raise ExportError(f"{folder}: the runtime carries no weights for {missing[:3]}; it was "
                          f"encoded from another model")
    with torch.no_grad():
        for name, value in state.items():
            if tuple(targets[name].shape) != value.shape:
                raise ExportError(f"{folder}: tensor {name} has shape {value.shape}, the model "
                                  f"{tuple(targets[name].shape)}; it was encoded from another model")
            targets[name].copy_(torch.from_numpy(value))
    return clone.eval()
