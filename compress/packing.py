"""Whole-model packing: pick the tensors to compress, produce records, load records back.

Records come in state-dict order (auxiliary ``table`` records first). The output embedding of a
model with tied embeddings is not stored; :func:`apply_records` re-ties it.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from edgebuild.core.errors import ConfigError, EdgebuildError, ModelError
from edgebuild.device_agent.codecs import TABLE, decode_all
from edgebuild.device_agent.packed import Record

log = logging.getLogger(__name__)

RAW = "raw"
RAW_DTYPES = ("float16", "bfloat16", "float32")


def _module_name(model, module) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None)


def _output_embedding_name(model) -> str | None:
    """State-dict name of the output embedding weight (``lm_head.weight``), if the model has one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    name = _module_name(model, head) if head is not None else None
    return f"{name}.weight" if name else None


def tied_output_name(model) -> str | None:
    """Name of the output embedding weight when it is tied to (shares storage with) the input one."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return None
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight.data_ptr() != embed.weight.data_ptr():
        return None
    return _output_embedding_name(model)


def select_linear_weights(model, include_embeddings: bool = False) -> list[str]:
    """State-dict names of the 2-D ``nn.Linear`` weights of the model, the output head excluded
    (for LLaMA-like models: q, k, v, o, gate, up, down of every decoder layer); with
    ``include_embeddings`` also the input embedding weight. In state-dict order."""
    from torch import nn

    head = _output_embedding_name(model)
    wanted = {f"{n}.weight" for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and m.weight.dim() == 2}
    wanted.discard(head)
    if include_embeddings:
        wanted.add(f"{_module_name(model, model.get_input_embeddings())}.weight")
    return [name for name in model.state_dict() if name in wanted]


def build_method(method: str, knobs: dict):
    from edgebuild.compress import methods

    cls = methods.get(method)
    try:
        return cls.from_knobs(dict(knobs))
    except KeyError as e:
        raise ConfigError(f"method {method!r}: {e.args[0] if e.args else e}",
                          hint="fix the knobs in the build config") from None
    except TypeError as e:
        raise ConfigError(f"method {method!r}: bad knob value ({e})",
                          hint="fix the knobs in the build config") from None


def pack_model(model, method: str, knobs: dict, ctx, *, include_embeddings: bool = False,
               raw_dtype: str = "float16") -> list[Record]:
    """Compress the selected tensors of ``model`` with ``method`` (built from ``knobs``) and store
    every other state-dict tensor as a ``raw`` record of ``raw_dtype``. The tied output embedding
    is skipped. Returns the records, tables first, then tensors in state-dict order."""
    if raw_dtype not in RAW_DTYPES:
        raise ConfigError(f"raw_dtype {raw_dtype!r} is not allowed (allowed: {', '.join(RAW_DTYPES)})")
    compressor = build_method(method, knobs)
    state = model.state_dict()
    skip = tied_output_name(model)
    selected = [n for n in select_linear_weights(model, include_embeddings) if n != skip]
    raw = [n for n in state if n != skip and n not in selected]
    total = len(selected) + len(raw)
    records = _compress_selected(compressor, state, selected, ctx, total)
    for done, name in enumerate(raw, start=len(selected) + 1):
        records.append(raw_record(name, state[name], raw_dtype))
        ctx.progress(done, total)
    order = {name: i for i, name in enumerate(state)}
    records.sort(key=lambda r: -1 if r.codec == TABLE else order[r.name])
    log.info("packed %d tensors with %s, %d raw (%s)", len(selected), method, len(raw), raw_dtype)
    return records


def pack_leftovers(records, method: str, knobs: dict, ctx, *, min_numel: int = 4096) -> list[Record]:
    """Chain onto an earlier stage: keep the records it already compressed and compress with
    ``method`` what it left in floating point — its ``raw`` 2-D tensors of at least ``min_numel``
    elements (the embedding matrix, for instance). Small tensors (norms) and tables stay as they are.
    Returns the records in the same order."""
    import torch

    from edgebuild.device_agent.codecs import decode

    compressor = build_method(method, knobs)
    chosen = [r for r in records if r.codec == RAW and len(r.shape) == 2 and r.numel >= min_numel]
    weights = {r.name: torch.from_numpy(decode(r)).to(ctx.device) for r in chosen}
    new = {r.name: r for r in _compress_selected(compressor, weights, list(weights), ctx, len(weights))}
    tables = [r for r in new.values() if r.codec == TABLE]
    log.info("compressed %d tensors left in floating point with %s", len(chosen), method)
    return tables + [new.get(r.name, r) if r.codec != TABLE else r for r in records]


def _compress_selected(compressor, state, selected, ctx, total) -> list[Record]:
    import torch

    weights = {n: state[n].detach().to(device=ctx.device, dtype=torch.float32) for n in selected}
    sub = dataclasses.replace(ctx, progress=lambda done, _: ctx.progress(done, total))
    records = list(compressor.compress(weights, sub)) if weights else []
    ctx.progress(len(selected), total)
    got = sorted(r.name for r in records if r.codec != TABLE)
    if got != sorted(selected):
        missing = sorted(set(selected) - set(got)) or sorted(set(got) - set(selected))
        raise EdgebuildError(f"method {compressor.name!r} returned records that do not match the "
                             f"weights it was given (first difference: {missing[:1]})")
    return records


def raw_record(name: str, tensor, dtype: str = "float16") -> Record:
    """A ``raw`` record of ``tensor`` stored as ``dtype`` (non-float tensors as float32)."""
    import torch

    t = tensor.detach().cpu()
    if not t.is_floating_point():
        dtype = "float32"
    if dtype == "bfloat16":
        data = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    else:
        data = t.to(getattr(torch, dtype)).numpy()
    return Record(name, tuple(t.shape), RAW, {"dtype": dtype}, {"data": data})


def apply_records(model, records) -> None:
    """Decode ``records`` with the device codecs and copy them into ``model`` in place; re-tie the
    output embedding. Raises ``ModelError`` when a record has no matching tensor, a shape differs,
    or a model tensor has no record; on error the model is left unchanged."""
    import torch

    decoded = decode_all(records)
    targets = model.state_dict(keep_vars=True)
    _check_match(decoded, targets, tied_output_name(model))
    with torch.no_grad():
        for name, array in decoded.items():
            source = array if array.flags.writeable else array.copy()
            targets[name].copy_(torch.from_numpy(source))
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _check_match(decoded: dict, targets: dict, tied: str | None) -> None:
    for name, array in decoded.items():
        if name not in targets:
            raise ModelError(f"packed weights hold tensor {name!r}, which the model does not have; "
                             "were they made for another model?")
        if tuple(targets[name].shape) != tuple(array.shape):
            raise ModelError(f"packed tensor {name!r} has shape {tuple(array.shape)}, the model "
                             f"expects {tuple(targets[name].shape)}")
    missing = [n for n in targets if n not in decoded and n != tied]
    if missing:
        raise ModelError(f"packed weights have no record for model tensor {missing[0]!r} "
                         f"({len(missing)} missing); were they made for another model?")


def packed_stats(records) -> dict:
    """Sizes of a record list: payload bytes, weight counts and bits per weight, per codec too.

    ``bits_per_weight`` counts the non-raw records (their tables included) over the weights they
    encode; ``bits_per_weight_all`` counts every byte over every stored weight."""
    by_codec: dict = {}
    for rec in records:
        entry = by_codec.setdefault(rec.codec, {"tensors": 0, "bytes": 0, "weights": 0})
        entry["tensors"] += 1
        entry["bytes"] += rec.nbytes
        entry["weights"] += 0 if rec.codec == TABLE else rec.numel
    payload = sum(e["bytes"] for e in by_codec.values())
    total = sum(e["weights"] for e in by_codec.values())
    raw = by_codec.get(RAW, {"bytes": 0, "weights": 0})
    compressed, compressed_bytes = total - raw["weights"], payload - raw["bytes"]
    return {
        "bytes_payload": payload,
        "compressed_weights": compressed,
        "total_weights": total,
        "bits_per_weight": 8 * compressed_bytes / compressed if compressed else 0.0,
        "bits_per_weight_all": 8 * payload / total if total else 0.0,
        "by_codec": by_codec,
    }


def method_info() -> list[dict]:
    """One entry per registered method: name, reference flag, knobs with defaults, one-line doc.
    A method whose module cannot be imported is listed with ``available: False`` and the reason."""
    from edgebuild.compress import methods

    return [_describe(name, methods) for name in methods.names()]


def _describe(name: str, methods) -> dict:
    try:
        cls = methods.get(name)
        knobs = {f.name: _default(f) for f in dataclasses.fields(cls.config_class)}
    except Exception as e:  # any import-time failure of a plug-in is reported, not raised
        return {"name": name, "available": False, "reference": False, "knobs": {}, "doc": "",
                "reason": f"{type(e).__name__}: {e}"}
    doc = (cls.__doc__ or "").strip().splitlines()
    return {"name": name, "available": True, "reference": bool(cls.reference), "knobs": knobs,
            "doc": doc[0] if doc else "", "reason": "", "space": dict(cls.knob_space),
            "order": list(cls.knob_order)}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None
