"""The float runtime graph, built by onnxruntime-genai's model builder, and where each weight lives in it.

``build_float_graph`` runs ``onnxruntime_genai.models.builder`` (precision fp32, CPU) on a Hugging
Face directory: one decoder graph with ``GroupQueryAttention`` (rotary embedding fused, one KV
buffer per layer shared by past and present), ``SkipSimplifiedLayerNormalization``, packed QKV
projections and a tied embedding read as the transpose of the head, plus ``genai_config.json``
and the tokenizer files. The encodings then rewrite its weights (``edgebuild.export.blockwise``).

``tensor_map`` says, for every tensor of the model's state dict, which graph value carries it
(the output of a ``MatMul``/``Gather`` whatever encoding later replaces the node, or an
initializer), and checks it against the weights the graph was built from, so a change in the
builder's layout is an error here rather than wrong weights later.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path

import numpy as np

from edgebuild.export import onnx_edit
from edgebuild.export.base import ExportError

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul$")
_MODULES = {"attn": "self_attn", "mlp": "mlp"}
HEAD_NODE = "/lm_head/MatMul"
EMBED_NODE = "/model/embed_tokens/Gather"


def build_float_graph(hf_dir, out_dir, cache_dir) -> Path:
    """Run onnxruntime-genai's builder on ``hf_dir`` into ``out_dir`` (fp32, CPU); return ``out_dir``."""
    from onnxruntime_genai.models import builder

    out_dir, chatter = Path(out_dir), io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), \
                onnx_edit.quiet("onnxruntime", "onnx_ir", "transformers"):
            options = builder.parse_extra_options("", str(hf_dir), str(out_dir), "fp32", "cpu",
                                                  str(cache_dir), [])
            builder.create_model("", str(hf_dir), str(out_dir), "fp32", "cpu", str(cache_dir), **options)
    except Exception as err:  # the builder raises bare Exceptions and NotImplementedErrors
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ExportError(f"onnxruntime-genai's model builder cannot build this model ({first})") from err
    log.debug("model builder output: %s", chatter.getvalue()[-2000:])
    return out_dir


def _layer_weight(match, config) -> list:
    """``[(state-dict name, rows or None)]`` carried by one layer MatMul of the builder."""
    layer, block, proj = int(match.group(1)), match.group(2), match.group(3)
    prefix = f"model.layers.{layer}.{_MODULES[block]}"
    if proj == "qkv_proj":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        return [(f"{prefix}.q_proj.weight", [0, q]), (f"{prefix}.k_proj.weight", [q, q + kv]),
                (f"{prefix}.v_proj.weight", [q + kv, q + 2 * kv])]
    if proj == "gate_up_proj":
        inter = config.intermediate_size
        return [(f"{prefix}.gate_proj.weight", [0, inter]), (f"{prefix}.up_proj.weight", [inter, 2 * inter])]
    return [(f"{prefix}.{proj}.weight", None)]


def _matmul_entries(model, config) -> dict:
    entries = {}
    for n in model.graph.node:
        match = _LAYER.match(n.name) if n.op_type == "MatMul" else None
        if match:
            for name, rows in _layer_weight(match, config):
                entries[name] = {"op": "matmul", "value": n.output[0], "rows": rows}
    return entries


def _norm_entries(model, config) -> dict:
    entries = {}
    final = f"model.layers.{config.num_hidden_layers}.final_norm_layernorm.weight"
    for tensor in model.graph.initializer:
        if tensor.name == final:
            entries["model.norm.weight"] = {"op": "initializer", "value": tensor.name}
        elif re.match(r"^model\.layers\.\d+\.(input|post_attention)_layernorm\.weight$", tensor.name):
            entries[tensor.name] = {"op": "initializer", "value": tensor.name}
    return entries


def head_and_embedding(model) -> tuple:
    """``(embedding Gather node name, head MatMul node name or None)`` of a float builder graph."""
    names = {n.name for n in model.graph.node}
    if EMBED_NODE not in names:
        raise ExportError(f"the builder's graph has no {EMBED_NODE} node; its layout changed")
    return EMBED_NODE, HEAD_NODE if HEAD_NODE in names else None


def linear_nodes(model) -> list:
    """Names of the decoder layers' float ``MatMul`` nodes (the output head excluded)."""
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and _LAYER.match(n.name)]


def tensor_map(model, config, state: dict) -> dict:
    """``{state-dict name: {"op", "value", "rows"?}}`` for a float builder graph, checked against
    ``state`` (the float weights the graph was built from)."""
    gather, head = head_and_embedding(model)
    entries = {**_matmul_entries(model, config), **_norm_entries(model, config)}
    entries["model.embed_tokens.weight"] = {"op": "gather", "value": onnx_edit.node(model, gather).output[0]}
    if head is not None:
        entries["lm_head.weight"] = {"op": "matmul", "value": onnx_edit.node(model, head).output[0]}
    missing = sorted(set(state) - set(entries))
    if missing:
        raise ExportError(f"the runtime graph carries no tensor for {missing[:3]} ({len(missing)} in "
                          f"all); this architecture is not supported by the runtime export")
    from edgebuild.export.deployed import graph_weights

    found = graph_weights(model, {k: v for k, v in entries.items() if k in state})
    for name, value in found.items():
        if value.shape != state[name].shape or not np.array_equal(value, state[name]):
            raise ExportError(f"the runtime graph's tensor for {name!r} does not hold the model's "
                              f"weights; the builder's layout changed")
    return {k: v for k, v in entries.items() if k in state}
