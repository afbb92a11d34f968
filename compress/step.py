"""The pack step: compress a stage's weights with its method and write the packed artifact."""
from __future__ import annotations

import time
from pathlib import Path

from edgebuild.core.cache import code_version, digest
from edgebuild.core.steps import BuildContext, StageRun, Step, execute

PACKED = "weights.ebpk"


class PackStep(Step):
    """Records of the stage's weights (the baseline's as float32, a compressed stage's from its
    method), written as ``weights.ebpk``; the record holds bytes, sha256, stats and method facts."""

    name = "pack"

    def key(self, ctx: BuildContext, run: StageRun) -> str:
        sc, source = run.spec, _source(ctx, run)
        fallback = [run.trial.get("fallback_layers"), sc.fallback_knobs] if run.trial.get("fallback_layers") else None
        return digest("pack", ctx.ref.fingerprint, source.keys["pack"] if source else None, sc.method,
                      sc.knobs, sc.include_embeddings, sc.scope, ctx.config.seed,
                      ctx.config.calibration_texts, code_version("compress", "device_agent"),
                      *([fallback] if fallback else []))

    def run(self, ctx: BuildContext, run: StageRun, work: Path) -> dict:
        from edgebuild.compress.packing import packed_stats
        from edgebuild.device_agent import packed
        sc, t0 = run.spec, time.time()
        if run.trial.get("fallback_layers"):
            records, facts = _with_fallback(ctx, run, self)
        else:
            records, facts = _compress(ctx, run, _source(ctx, run))
        sha = packed.write(work / PACKED, records, meta={"stage": run.stage, "method": sc.method,
                                                         "knobs": sc.knobs, "model": ctx.ref.spec})
        return {"method": sc.method, "knobs": sc.knobs, "sha256": sha, "bytes": (work / PACKED).stat().st_size,
                "stats": packed_stats(records), "facts": facts, "seconds": time.time() - t0,
                "reference_method": _is_reference(sc.method)}

    def apply(self, ctx: BuildContext, run: StageRun, record: dict, entry: Path | None) -> None:
        run.pack = dict(record, path=str(entry / PACKED))


def _source(ctx: BuildContext, run: StageRun):
    """The stage run whose weights this one compresses (None for the baseline)."""
    return ctx.passed.get(run.source) if run.source else None


def _is_reference(method: str) -> bool:
    if method == "raw":
        return False
    from edgebuild.compress import methods
    return bool(getattr(methods.get(method), "reference", False))


def _compress(ctx: BuildContext, run: StageRun, source) -> tuple[list, dict]:
    from edgebuild.compress.base import CompressContext
    from edgebuild.compress.packing import pack_leftovers, pack_model
    sc = run.spec
    model, tok = ctx.models.source(source)
    if sc.method == "raw":
        return raw_records(model), {}
    cctx = CompressContext(model=model, tokenizer=tok, calibration_texts=ctx.texts.calibration(),
                           device=str(ctx.torch_device), seed=ctx.config.seed)
    with ctx.progress.step(f"compress {run.stage} ({sc.method})", unit="tensors") as update:
        cctx.progress = update
        if sc.scope == "leftovers":
            records = pack_leftovers(ctx.models.records(source), sc.method, sc.knobs, cctx)
        else:
            records = pack_model(model, sc.method, sc.knobs, cctx, include_embeddings=sc.include_embeddings)
    return records, cctx.log


def _with_fallback(ctx: BuildContext, run: StageRun, step: PackStep) -> tuple[list, dict]:
    """The records of the same setting without fallback (packed first when not cached), with the
    tensors of its ``fallback_layers`` most sensitive decoder layers re-encoded from the source
    weights by ``rtn`` with ``fallback_knobs`` (8-bit by default)."""
    from edgebuild.compress.packing import build_method
    from edgebuild.compress.sensitivity import layer_of, layer_sensitivity
    from edgebuild.device_agent import codecs, packed
    parent = StageRun(run.stage, run.method, run.knobs, run.attempt, run.source, spec=run.spec)
    records = packed.read(_parent_path(ctx, parent, step))[1]
    model, tok = ctx.models.source(_source(ctx, run))
    ranked = layer_sensitivity(model, codecs.decode_all(records), tok, ctx.texts.calibration()[:8])
    keep = {layer for layer, _ in ranked[:run.trial["fallback_layers"]]}
    rtn, state = build_method("rtn", run.spec.fallback_knobs), model.state_dict()
    out = [rtn.compress_one(r.name, state[r.name]) if layer_of(r.name) in keep and r.codec != "raw" else r
           for r in records]
    return out, {"fallback": {"layers": sorted(keep), "knobs": run.spec.fallback_knobs,
                              "sensitivity": [[layer, round(kl, 6)] for layer, kl in ranked]}}


def _parent_path(ctx: BuildContext, parent: StageRun, step: PackStep) -> Path:
    _, entry = execute(step, ctx, parent)
    return entry / PACKED


def raw_records(model) -> list:
    """The uncompressed model: every tensor as float32 (the tied lm_head is not stored twice)."""
    from edgebuild.device_agent.packed import Record
    out = []
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        arr = t.detach().float().cpu().numpy()
        out.append(Record(name, tuple(arr.shape), "raw", {"dtype": "float32"}, {"data": arr}))
    return out

