"""The device step: stage a build stage on the target's agent, time it there, and score the
benchmark items the host scored, with the agreement between the two."""
from __future__ import annotations

import json
from pathlib import Path

from edgebuild.core.cache import code_version, digest
from edgebuild.core.errors import EdgebuildError
from edgebuild.core.steps import BuildContext, StageRun, Step


class DeviceStep(Step):
    """Record: ``{"status": "ok", "version", "info", "prefill_ms": [...], "decode_ms_per_token":
    [...], ...}`` plus device scores, or ``{"status": "unreachable", ...}`` (never cached: the device
    may be back next time)."""

    name = "device"
    needs = ("pack", "graph")

    def key(self, ctx: BuildContext, run: StageRun) -> str:
        tasks = device_tasks(ctx.config)
        return digest("device", 2, run.keys["pack"], run.keys["graph"], ctx.target.digest(), tasks,
                      device_profile(ctx.config), ctx.config.seed, code_version("device_agent", "targets"),
                      code_version("bench") if tasks else None)

    def run(self, ctx: BuildContext, run: StageRun, work: Path) -> dict:
        client = ctx.device.connect()
        if client is None:
            return _unreachable(ctx, run)
        version = _stage_on_device(ctx, run, client)
        result = {"status": "ok", "version": version, "info": ctx.device.info, **_time(ctx, run, client, version),
                  "excluded_tasks": excluded_tasks(ctx.config)}
        if device_tasks(ctx.config):
            result.update(_score(ctx, run, client))
        return result

    def apply(self, ctx: BuildContext, run: StageRun, record: dict, entry: Path | None) -> None:
        run.device = record

    def cacheable(self, record: dict) -> bool:
        return record.get("status") == "ok"


def _stage_on_device(ctx: BuildContext, run: StageRun, client) -> str:
    from edgebuild.targets.client import deploy_stage
    graph = ctx.cache.path("graph", run.keys["graph"])
    files = {"model.onnx": graph / "model.onnx", "graph.json": graph / "graph.json",
             "weights.ebpk": Path(run.pack["path"])}
    version = digest(run.keys["pack"], run.keys["graph"])[:16]
    transport = ctx.device.transport
    with ctx.progress.step(f"upload {run.stage}", unit="bytes") as update:
        transport.progress = update
        try:
            deploy_stage(client, transport, run.stage, version, files)
        finally:
            transport.progress = None
    return version


def _time(ctx: BuildContext, run: StageRun, client, version: str) -> dict:
    rt, t = ctx.target.runtime, ctx.target.timing
    with ctx.progress.step(f"device {run.stage}"):
        client.load(run.stage, version, threads=rt.threads)
        return client.time(prompt_len=t.prompt_len, decode_tokens=t.decode_tokens, warmup=t.warmup,
                           repeats=t.repeats)


def _score(ctx: BuildContext, run: StageRun, client) -> dict:
    """The device's own benchmark scores (same items and prompts as the host's, fewer of them with
    a smaller device profile) and their agreement with the host's."""
    from edgebuild.bench.devicelm import agreement, run_device
    model, tok = ctx.models.base()
    tasks = [t for t in device_tasks(ctx.config) if t in run.host and run.host[t].get("items")]
    if not tasks:
        return {}
    profile = device_profile(ctx.config)
    with ctx.progress.step(f"device benchmarks {run.stage}", unit="items") as update:
        dev = run_device(client, tok, tasks, profile, ctx.data_dir, ctx.data_cache, seed=ctx.config.seed,
                         progress=update, max_length=getattr(model.config, "max_position_embeddings", 2048))
    scores = {t: r.to_dict() for t, r in dev.results.items()}
    both = {t: {i[0] for i in run.host[t]["items"]} & {i[0] for i in scores[t]["items"]} for t in tasks}
    pick = lambda items, t: [i for i in items if i[0] in both[t]]  # noqa: E731
    host = {t: pick(run.host[t]["items"], t) for t in tasks}
    return {"scores": scores, "profile": profile,
            "host_scores": {t: sum(c for _, c in host[t]) / len(host[t]) for t in tasks if host[t]},
            "agreement": agreement(host, {t: pick(scores[t]["items"], t) for t in tasks})}


def device_profile(cfg) -> str:
    """The device's profile, never larger than the host's: its items are a subset of the host's."""
    from edgebuild.bench.profiles import PROFILES
    return min(cfg.device_profile, cfg.profile, key=list(PROFILES).index)


GENERATION_REASON = ("a generation task: the device scores log-likelihood tasks; generation is timed on "
                     "the device and scored on the host")


def device_tasks(cfg) -> list:
    """The host tasks the device scores too (``excluded_tasks`` says which are left out, and why)."""
    tasks = cfg.tasks if cfg.device_tasks is None else cfg.device_tasks
    return [t for t in tasks if t in cfg.tasks and t not in excluded_tasks(cfg)]


def excluded_tasks(cfg) -> dict:
    """``{task: why the device does not score it}`` among the build's tasks."""
    from edgebuild.bench import benchmarks
    return {t: GENERATION_REASON for t in cfg.tasks if t in benchmarks and benchmarks.get(t).generation is not None}


def _unreachable(ctx: BuildContext, run: StageRun) -> dict:
    from edgebuild.targets.spec import predicted_latency
    result = {"status": "unreachable", "error": ctx.device.state, "target": ctx.target.name}
    try:
        graph = json.loads((ctx.cache.path("graph", run.keys["graph"]) / "graph.json").read_text())
        predicted = predicted_latency(ctx.target, graph)
    except (OSError, ValueError, KeyError, TypeError, EdgebuildError):
        predicted = None
    if predicted:
        result["predicted"] = dict(predicted, label="predicted")
    return result
