"""The pack step: compress a stage's weights with its method and write the packed artifact."""
from __future__ import annotations

import time
from pathlib import Path

from edgebuild.core.cache import code_version, digest
from edgebuild.core.steps import BuildContext, StageRun, Step

PACKED = "weights.ebpk"


class PackStep(Step):
    """Records of the stage's weights (the baseline's as float32, a compressed stage's from its
    method), written as ``weights.ebpk``; the record holds bytes, sha256, stats and method facts."""

    name = "pack"

    def key(self, ctx: BuildContext, run: StageRun) -> str:
        sc, source = run.spec, _source(ctx, run)
        return digest("pack", ctx.ref.fingerprint, source.keys["pack"] if source else None, sc.method,
                      sc.knobs, sc.include_embeddings, sc.scope, ctx.config.seed,
                      ctx.config.calibration_texts, code_version("compress", "device_agent"))

    def run(self, ctx: BuildContext, run: StageRun, work: Path) -> dict:
        from edgebuild.compress.packing import packed_stats
        from edgebuild.device_agent import packed
        sc, t0 = run.spec, time.time()
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
                           device=compute_device(), seed=ctx.config.seed)
    with ctx.progress.step(f"compress {run.stage} ({sc.method})") as update:
        cctx.progress = update
        if sc.scope == "leftovers":
            records = pack_leftovers(ctx.models.records(source), sc.method, sc.knobs, cctx)
        else:
            records = pack_model(model, sc.method, sc.knobs, cctx, include_embeddings=sc.include_embeddings)
    return records, cctx.log


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


def compute_device() -> str:
    """Where compression runs: ``cuda`` when a GPU is present, else ``cpu``."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"
