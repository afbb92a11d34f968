"""More items of one benchmark for a stage and its reference, until a retention verdict is
decisive (the sampling logic is ``edgebuild.bench.adaptive``; this module runs the items).

Items come from the same converted data and prompts as the profile's sample, scored on the
host's model of each stage and cached per (stage weights, task, item ids)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from edgebuild.core.cache import code_version, digest
from edgebuild.core.data import data_fingerprint
from edgebuild.core.files import write_json_atomic


def extend(ctx, run, reference, task: str, threshold: float, gates, limit: int):
    """Sample more items of ``task`` (doubling, at most ``limit`` and 4x the profile's sample)
    until retention against ``threshold`` is decided under ``gates`` (retention kind, confidence,
    bootstrap). Returns ``(run's result, reference's result)`` with every item evaluated, the
    run's carrying the rounds under ``"adaptive"``; None when the task cannot be extended
    (stratified or generation tasks, no items left, already at the limit)."""
    from edgebuild.bench import adaptive, benchmarks
    bench, res = benchmarks.get(task), run.host[task]
    if bench.strata_key is not None or bench.generation is not None:
        return None
    docs = bench.convert(Path(ctx.data_dir)).eval_docs
    order = adaptive.extension_order(task, len(docs), [d for d, _ in res["items"]], ctx.config.seed)
    limit = min(limit, 4 * len(res["items"]))     # at most two doublings past the profile's sample
    if not order or len(res["items"]) >= limit:
        return None
    ctx.progress.note(f"[{run.stage}] {task}: retention inconclusive, sampling more items")
    out = adaptive.sample_until_decisive(
        lambda ids: extra_items(ctx, run, task, ids), _reference_items(ctx, reference, task),
        order, threshold=threshold, chance=res["chance"], initial=res["items"], kind=gates.retention,
        confidence=gates.confidence, n_boot=gates.bootstrap, seed=ctx.config.seed, max_items=limit)
    extended = with_items(res, out.items, bench, docs)
    extended["adaptive"] = [dataclasses.asdict(r) for r in out.history]
    return extended, with_items(reference.host[task], out.baseline_items, bench, docs)


def _reference_items(ctx, reference, task: str):
    """Reference items by doc id: those it already has, the rest evaluated (and cached)."""
    known = {int(d): [int(d), c] for d, c in reference.host[task]["items"]}

    def items(ids):
        missing = [int(i) for i in ids if int(i) not in known]
        for d, c in extra_items(ctx, reference, task, missing) if missing else []:
            known[int(d)] = [int(d), c]
        return [known[int(i)] for i in ids]
    return items


def extra_items(ctx, run, task: str, ids: list) -> list:
    """``[[doc_id, correct]]`` of ``run``'s model on the items ``ids`` of ``task`` (cached)."""
    cfg, ids = ctx.config, sorted(int(i) for i in ids)
    key = digest("host-items", run.keys["pack"], run.keys.get("runtime"), task, ids, data_fingerprint(ctx.data_dir), cfg.seed,
                 code_version("bench"))
    entry = ctx.cache.get("hostitems", key)
    if entry is None:
        from edgebuild.bench.runner import run_host
        model, tok = ctx.models.for_stage(run)
        with ctx.cache.build("hostitems", key) as work, \
                ctx.progress.step(f"{len(ids)} more items of {task} ({run.stage})") as update:
            res = run_host(model, tok, [task], cfg.profile, ctx.data_dir, ctx.data_cache, seed=cfg.seed,
                           doc_ids={task: ids}, progress=update)
            write_json_atomic(work / "items.json", res[task].items)
        entry = ctx.cache.path("hostitems", key)
    return json.loads((entry / "items.json").read_text())


def with_items(result: dict, items: list, bench, docs: list) -> dict:
    """A task result carrying ``items`` (sorted by doc id), with score, n and chance recomputed
    (plain means: adaptive sampling extends unstratified tasks only)."""
    items = sorted(([int(d), float(c)] for d, c in items), key=lambda item: item[0])
    chance = sum(bench.chance_of(docs[d]) for d, _ in items) / len(items)
    return dict(result, items=items, n=len(items), score=sum(c for _, c in items) / len(items),
                chance=chance, stderr=None)
