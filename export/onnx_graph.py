"""ONNX export of a causal LM with an explicit KV cache, without weight data.

``torch.onnx.export(..., dynamo=True)`` traces a wrapper that takes the flat past keys/values and
returns the logits and the flat present keys/values (batch, sequence and past lengths dynamic).
The graph is exported unoptimised so that every weight stays one named initializer; onnxruntime
applies its own graph optimisations when the runtime loads it. Each weight initializer is then
turned into a reference to external data that is never written: the device runtime binds the
stage's decoded weights in its place (``edgebuild.device_agent.runtime``).
"""
from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from edgebuild.core.errors import ConfigError
from edgebuild.core.files import atomic_path, write_text_atomic
from edgebuild.core.models import cache_arg
from edgebuild.device_agent.runtime import GRAPH_FILE, GRAPH_FORMAT, MODEL_FILE, Runtime, RuntimeLoadError
from edgebuild.export.base import Exporter, ExportError

log = logging.getLogger(__name__)

WEIGHTS_LOCATION = "weights.bound-at-load"  # never written: the runtime supplies the data
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
)
# Largest logit difference accepted between onnxruntime and torch, both float32. Measured on
# SmolLM2-135M (30 layers, logits up to ~35): 4e-5 to 7e-5 on text prompts, 1.2e-4 on random tokens,
# and up to 1.5e-3 on a run of special tokens (ids 1-8), whatever onnxruntime's kernels (pre-packed
# or not, 1 or 2 threads). Any wrong, missing or quantised weight moves logits by 1e-1 or more.
TOLERANCE = 2e-3


class CachedCausalLM(torch.nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)`` around an HF model."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self._cache_arg = cache_arg(lm)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        for i in range(0, len(past), 2):
            cache.update(past[i], past[i + 1], i // 2)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, **{self._cache_arg: cache})
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]  # updated in place
        return (out.logits, *present)


def io_names(num_layers: int) -> tuple:
    """Graph input and output names for a model of ``num_layers`` decoder layers."""
    kinds = [(i, kind) for i in range(num_layers) for kind in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{k}" for i, k in kinds]
    outputs = ["logits"] + [f"present.{i}.{k}" for i, k in kinds]
    return inputs, outputs


def _sample_inputs(wrapper: CachedCausalLM, num_layers: int) -> tuple:
    """Example inputs with distinct sizes > 1 (batch 2, sequence 4, past 3), so no dim is specialised."""
    batch, seq, past_len = 2, 4, 3
    vocab, device = wrapper.lm.config.vocab_size, next(wrapper.lm.parameters()).device
    ids = torch.arange(batch * seq, device=device).reshape(batch, seq) % vocab
    mask = torch.ones(batch, past_len + seq, dtype=torch.long, device=device)
    positions = torch.arange(past_len, past_len + seq, device=device).expand(batch, seq)
    with torch.no_grad():
        empty = wrapper(ids[:, :1], mask[:, :1], positions[:, :1] * 0)[1:]
    past = [torch.zeros(batch, t.shape[1], past_len, t.shape[3], device=device) for t in empty]
    if len(past) != 2 * num_layers:
        raise ExportError(f"the model returned {len(past)} cache tensors for {num_layers} layers; "
                          f"only decoder-only models with one key/value cache per layer can be exported")
    return ids, mask, positions, *past


def _dynamic_shapes(num_layers: int) -> tuple:
    dim = torch.export.Dim
    batch, seq, total, past = dim("batch"), dim("sequence"), dim("total_sequence"), dim("past_sequence")
    cache = tuple({0: batch, 2: past} for _ in range(2 * num_layers))
    return {0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, cache


def _export(wrapper, args, inputs, outputs, opset):
    num_layers = wrapper.lm.config.num_hidden_layers
    with warnings.catch_warnings():
        # one Dim shared by several inputs is intended; the exporter warns about each reuse
        warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
        # the exporter logs one line per torchvision operator it cannot register; none are used here
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        return torch.onnx.export(
            wrapper, args, dynamic_shapes=_dynamic_shapes(num_layers), input_names=inputs,
            output_names=outputs, opset_version=opset, dynamo=True, optimize=False, verbose=False)


def weight_sources(wrapper: torch.nn.Module, lm: torch.nn.Module) -> dict:
    """``{wrapper parameter name: state-dict name of lm}``; a tied parameter maps to its first name.

    ``lm.state_dict()`` lists ``model.embed_tokens.weight`` before ``lm_head.weight``, so tied
    embeddings resolve to the embedding, the name the packed weights keep.
    """
    first = {}
    for name, tensor in lm.state_dict(keep_vars=True).items():
        first.setdefault(id(tensor), name)
    return {name: first[id(p)] for name, p in wrapper.named_parameters(remove_duplicate=False)
            if id(p) in first}


def _is_matrix_transpose(node) -> bool:
    perm = node.attributes.get("perm")
    return node.op_type == "Transpose" and perm is not None and list(perm.value) == [1, 0]


def _pretransposed(graph, node, value):
    """Replace ``node`` (a 2-D Transpose of the weight ``value``) by a pre-transposed initializer."""
    from onnxscript import ir

    shape = ir.Shape(list(reversed(value.const_value.shape)))
    new = ir.Value(name=f"{value.name}.T", shape=shape, type=ir.TensorType(value.const_value.dtype),
                   const_value=_external(value.const_value.dtype, shape, f"{value.name}.T", 0))
    graph.register_initializer(new)
    node.outputs[0].replace_all_uses_with(new)
    graph.remove(node, safe=True)
    return new


def _external(dtype, shape, name, offset):
    from onnxscript import ir

    nbytes = int(dtype.itemsize * math.prod(shape.numpy()))
    return ir.ExternalTensor(WEIGHTS_LOCATION, offset, nbytes, dtype, shape=shape, name=name)


def _strip_weights(graph, sources: dict) -> dict:
    """Turn every weight initializer into an unwritten external reference; return the weight map.

    A weight read through ``Transpose(perm=[1, 0])`` (every ``nn.Linear``) gets a pre-transposed
    initializer instead (``"transpose": true``), so onnxruntime finds MatMul's layout as given and
    makes no transposed copy of its own; the untransposed one goes when nothing else reads it.
    """
    weights = {}
    for name, source in sources.items():
        value = graph.initializers.get(name)
        if value is None:
            continue  # a parameter the traced forward never reads
        for node in [use.node for use in list(value.uses()) if _is_matrix_transpose(use.node)]:
            weights[_pretransposed(graph, node, value).name] = (source, True)
        if value.uses():
            weights[name] = (source, False)
        else:
            graph.initializers.pop(name)
    missing = sorted(set(sources.values()) - {source for source, _ in weights.values()})
    if missing:
        raise ExportError(f"the exported graph has no initializer for {missing[:3]}; the exporter "
                          f"folded or renamed weights, so stages could not bind theirs")
    return _point_to_unwritten_data(graph, weights)


def _point_to_unwritten_data(graph, weights: dict) -> dict:
    out, offset = {}, 0
    for name, (source, transpose) in weights.items():
        value = graph.initializers[name]
        tensor = value.const_value
        value.const_value = _external(tensor.dtype, tensor.shape, name, offset)
        offset += value.const_value.nbytes
        out[name] = {"source": source, "transpose": transpose, "dtype": str(tensor.dtype.numpy()),
                     "shape": list(tensor.shape)}
    return out


def _strip_trace_metadata(onnx_model) -> None:
    """Drop the per-node tracing notes (source lines, FX names): most of the file, and host paths."""
    for node in onnx_model.graph.all_nodes():
        node.metadata_props.clear()


def _check_model(model) -> None:
    if not hasattr(model, "config") or not hasattr(model.config, "num_hidden_layers"):
        raise ExportError("ONNX export needs a transformers causal LM with a config; got "
                          f"{type(model).__name__}")
    dtypes = {str(p.dtype) for p in model.parameters()}
    if dtypes != {"torch.float32"}:
        raise ExportError(f"ONNX export needs float32 weights, the model has {sorted(dtypes)}; "
                          f"load it with dtype=torch.float32")


def _eos_ids(model, tokenizer) -> list:
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]



class OnnxExporter(Exporter):
    """ONNX graph with a KV cache (float32, opset 18+), weights bound by the device runtime."""

    name = "onnx"

    def __init__(self, opset: int = 18, tolerance: float = TOLERANCE, decode_steps: int = 4):
        if opset < 18:
            raise ConfigError(f"ONNX opset {opset} is too old for the exporter; use 18 or newer")
        if decode_steps < 1:
            raise ConfigError(f"ONNX verification needs decode_steps >= 1, got {decode_steps}")
        self.opset = opset
        self.tolerance = tolerance
        self.decode_steps = decode_steps

    def export(self, model, tokenizer, out_dir) -> dict:
        """Export ``model`` to ``out_dir/model.onnx`` (no weight data) and ``out_dir/graph.json``."""
        _check_model(model)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        was_training = model.training
        wrapper = CachedCausalLM(model).eval()
        try:
            program, args = self._trace(wrapper)
        finally:
            model.train(was_training)
        graph = self._describe(model, tokenizer, args)
        graph["weights"] = _strip_weights(program.model.graph, weight_sources(wrapper, model))
        _strip_trace_metadata(program.model)
        from onnxscript import ir

        with atomic_path(out_dir / MODEL_FILE) as tmp:
            ir.save(program.model, tmp)
        write_text_atomic(out_dir / GRAPH_FILE, json.dumps(graph, indent=1))
        return graph

    def _trace(self, wrapper: CachedCausalLM) -> tuple:
        num_layers = wrapper.lm.config.num_hidden_layers
        args = _sample_inputs(wrapper, num_layers)
        inputs, outputs = io_names(num_layers)
        start = time.perf_counter()
        try:
            program = _export(wrapper, args, inputs, outputs, self.opset)
        except Exception as e:  # torch.export raises many unrelated types
            raise ExportError(f"torch.onnx.export failed for {type(wrapper.lm).__name__}: "
                              f"{str(e).splitlines()[0]}") from e
        log.info("traced %d layers to ONNX in %.1f s", num_layers, time.perf_counter() - start)
        return program, args

    def _describe(self, model, tokenizer, args) -> dict:
        num_layers = model.config.num_hidden_layers
        inputs, outputs = io_names(num_layers)
        past = args[3]
        return {"format": GRAPH_FORMAT, "opset": self.opset, "inputs": inputs, "outputs": outputs,
                "num_layers": num_layers, "num_kv_heads": int(past.shape[1]),
                "head_dim": int(past.shape[3]), "vocab_size": int(model.config.vocab_size),
                "eos_token_ids": _eos_ids(model, tokenizer), "model_type": model.config.model_type}

    def verify(self, out_dir, state: dict, model, tokenizer, prompts=None) -> dict:
        """Compare onnxruntime (weights ``state``) with ``model`` on prefill and cached greedy decode."""
        try:
            runtime = Runtime.load(out_dir, state=state)
        except RuntimeLoadError as e:
            raise ExportError(f"the exported graph does not accept these weights: {e}") from e
        prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
        if not prompts:
            raise ExportError("ONNX verification needs at least one prompt; "
                              "pass prompts=None for the defaults")
        was_training = model.training
        model.eval()
        try:
            compared = [self._compare(runtime, model, _prompt_ids(p, tokenizer)) for p in prompts]
        finally:
            model.train(was_training)
        diffs, matches = [d for d, _ in compared], [m for _, m in compared]
        worst = max(diffs)
        result = {"max_abs_diff": worst, "tolerance": self.tolerance, "greedy_match": all(matches),
                  "prompts": len(prompts), "per_prompt_max_abs_diff": diffs}
        log.info("ONNX verification: max |logit diff| %.2e (tolerance %.0e), greedy match %s",
                 worst, self.tolerance, result["greedy_match"])
        if not worst <= self.tolerance:  # also catches NaN
            raise ExportError(f"ONNX logits differ from torch by {worst:.3g} (tolerance "
                              f"{self.tolerance:g}); the graph or the weights bound to it are wrong")
        return result

    def _compare(self, runtime: Runtime, model, ids: list) -> tuple:
        """Max |logit diff| over prefill and decode steps, and whether greedy tokens agree."""
        tokens, steps = runtime.greedy(ids, self.decode_steps, stop_at_eos=False)
        ours = np.concatenate([runtime.logits(ids), steps[1:]])
        device = next(model.parameters()).device
        with torch.no_grad():
            full = torch.tensor([ids + tokens[:-1]], device=device)
            ref = model(input_ids=full).logits[0].float().cpu().numpy()
        diff = float(np.abs(ours - ref).max())
        match = bool((ref[len(ids) - 1:].argmax(axis=-1) == np.asarray(tokens)).all())
        return diff, match


def _prompt_ids(prompt, tokenizer) -> list:
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    if tokenizer is None:
        raise ExportError("verifying on text prompts needs the model's tokenizer; pass it or give token ids")
    ids = list(tokenizer(prompt)["input_ids"])
    if not ids:
        raise ExportError(f"prompt {prompt!r} tokenizes to nothing; use a non-empty prompt")
    return ids
