"""The device step: stage a build stage's runtime directory on the target's agent, measure it there
in a fresh process (its own memory, load time, prefill and decode samples, the sha256 of the runtime
weights computed on the device, compared with the host's), and score the benchmark items the host
scored, with the agreement between the two (the same predictions, the largest |Δ log-likelihood|).

On a labgrid group (``pool_session.PoolSession``) the stage is deployed and loaded on every board,
measured on one (the record's ``board``) and its benchmark requests are sharded across them; the
record's ``boards`` says which boards served the stage, the requests each scored and which were
lost (their requests were scored again by the others)."""
from __future__ import annotations

import json
from pathlib import Path

from edgebuild.core.cache import code_version, digest
from edgebuild.core.errors import EdgebuildError
from edgebuild.core.steps import BuildContext, StageRun, Step
from edgebuild.targets.client import ConnectionLost
from edgebuild.targets.labgrid import board_group


class DeviceStep(Step):
    """Record: ``{"status": "ok", "version", "info", "prefill_ms": [...], "decode_ms_per_token":
    [...], "peak_rss_mb", "stage_rss_mb", "load_s", "stored_bytes", "weights": {"host", "device",
    "match"}, ...}`` plus device scores (and ``reconnects`` when faults were survived; on a
    labgrid group, ``board``: where it was measured, and ``boards``: ``{"places", "items", "lost"}``), or
    ``{"status": "unreachable", ...}``, or ``{"status": "lost", "error", "after": "upload" | "measure" |
    "load" | "score", "partial": {what was measured before}}`` when the device went away mid-step
    and stayed away (never cached, either: the device may be back next time)."""

    name = "device"
    needs = ("pack", "runtime")

    def key(self, ctx: BuildContext, run: StageRun) -> str:
        tasks = device_tasks(ctx.config)
        return digest("device", 3, run.keys["pack"], run.keys["runtime"], ctx.target.digest(), tasks,
                      device_profile(ctx.config), ctx.config.seed, code_version("device_agent", "targets"),
                      code_version("bench") if tasks else None, *board_group(ctx.target))

    def run(self, ctx: BuildContext, run: StageRun, work: Path) -> dict:
        session = ctx.device
        if session.connect() is None:
            return _unreachable(ctx, run)
        before, start = session.reconnects, session.boards()
        result = {"status": "ok", "info": session.info, "excluded_tasks": excluded_tasks(ctx.config)}
        scored = {}
        try:
            result["version"] = session.attempt("upload", lambda c: _stage_on_device(ctx, run, c))
            measured = session.attempt("measure", lambda c: _measure(ctx, run, c, result["version"]))
            loaded = session.attempt("load", lambda c: _load(ctx, run, c, result["version"]))
            measured["load_weights_sha256"] = loaded.get("weights_sha256")
            result.update(measured, weights=weights_check(run, measured))
            if device_tasks(ctx.config):
                result.update(session.attempt("score", lambda c: _score(ctx, run, c, scored)))
        except ConnectionLost as err:
            return _with_boards(session, start, _lost(ctx, result, err, scored))
        if session.reconnects > before:
            result["reconnects"] = session.reconnects - before
        return _with_boards(session, start, result)

    def apply(self, ctx: BuildContext, run: StageRun, record: dict, entry: Path | None) -> None:
        run.device = record

    def cacheable(self, record: dict) -> bool:
        return record.get("status") == "ok"


def _stage_on_device(ctx: BuildContext, run: StageRun, client) -> str:
    """Upload ``run``'s runtime directory and install it (within ``runtime.storage_budget_mb``)."""
    from edgebuild.device_agent.runtime_dir import upload_files
    from edgebuild.core.files import sha256_file
    files = upload_files(run.pack["runtime"]["path"])
    # runtime.json lists every file's sha256: the version names this content (a re-encoded stage
    # records another encoding time, so it is a new version, never a changed one)
    version = digest(run.keys["pack"], run.keys["runtime"], sha256_file(files["runtime.json"]))[:16]
    budget = ctx.target.runtime.storage_budget_mb
    with ctx.progress.step(f"upload {run.stage}", unit="bytes") as update:
        ctx.device.deploy(client, run.stage, version, files,
                          budget_bytes=int(budget * 1e6) if budget else None, progress=update)
    return version


def _with_boards(session, start: dict | None, record: dict) -> dict:
    """``record`` with what each board of a labgrid group did during the step (``boards``)."""
    if start is not None:
        record["boards"] = session.boards(since=start)
    return record


def _measure(ctx: BuildContext, run: StageRun, client, version: str) -> dict:
    """The stage measured alone in a fresh process on the device (the agent's ``measure``)."""
    t = ctx.target.timing
    with ctx.progress.step(f"device {run.stage}"):
        return client.measure(run.stage, version, threads=ctx.target.runtime.threads,
                              prompt_len=t.prompt_len, decode_tokens=t.decode_tokens,
                              warmup=t.warmup, repeats=t.repeats)


def _load(ctx: BuildContext, run: StageRun, client, version: str) -> dict:
    """The stage loaded in the agent for scoring; its ``weights_sha256`` is the hash that load computed."""
    with ctx.progress.step(f"device load {run.stage}"):
        return client.load(run.stage, version, threads=ctx.target.runtime.threads)


def weights_check(run: StageRun, measured: dict) -> dict:
    """The sha256 of the runtime weights as encoded on the host against the one computed on the
    device (by the measuring process and by the agent's load): ``match`` only when all agree."""
    host = run.pack["runtime"]["weights_sha256"]
    device = [measured.get("weights_sha256"), measured.get("load_weights_sha256")]
    return {"host": host, "device": device[0], "match": all(d == host for d in device)}


def _lost(ctx: BuildContext, result: dict, err: ConnectionLost, scored: dict) -> dict:
    """The record of a device lost mid-step: why, in which phase, and what it had measured."""
    lost = ctx.device.lost or {"after": "upload", "error": err.one_line()}
    partial = {k: v for k, v in result.items() if k not in ("status", "info", "excluded_tasks")}
    if scored:
        partial["scored_requests"] = dict(scored)
    return {"status": "lost", "error": lost["error"], "after": lost["after"], "target": ctx.target.name,
            "reconnect_attempts": lost.get("retries"), "partial": partial}


def _score(ctx: BuildContext, run: StageRun, client, scored: dict) -> dict:
    """The device's own benchmark scores (same items and prompts as the host's, fewer of them with
    a smaller device profile) and their agreement with the host's; ``scored`` follows how many
    requests were answered (``{"done", "total"}``)."""
    from edgebuild.bench.devicelm import agreement, run_device
    model, tok = ctx.models.base()
    tasks = [t for t in device_tasks(ctx.config) if t in run.host and run.host[t].get("items")]
    if not tasks:
        return {}
    profile = device_profile(ctx.config)
    with ctx.progress.step(f"device benchmarks {run.stage}", unit="items") as update:
        def progress(done, total):
            scored.update(done=done, total=total)
            update(done, total)
        dev = run_device(client, tok, tasks, profile, ctx.data_dir, ctx.data_cache, seed=ctx.config.seed,
                         progress=progress, max_length=getattr(model.config, "max_position_embeddings", 2048))
    scores = {t: r.to_dict() for t, r in dev.results.items()}
    both = {t: {i[0] for i in run.host[t]["items"]} & {i[0] for i in scores[t]["items"]} for t in tasks}
    pick = lambda items, t: [i for i in items if i[0] in both[t]]  # noqa: E731
    host = {t: pick(run.host[t]["items"], t) for t in tasks}
    return {"scores": scores, "profile": profile,
            "host_scores": {t: sum(c for _, c in host[t]) / len(host[t]) for t in tasks if host[t]},
            "agreement": agreement(*_compared(run, dev, scores, tasks, both))}


def _compared(run: StageRun, dev, scores: dict, tasks: list, both: dict) -> tuple:
    """``(host, device)`` for ``agreement`` on the items both scored: each answer's log-likelihood
    on both sides when the host recorded them for every task (``TaskResult.responses``), else
    each item's correctness."""
    responses = {t: run.host[t].get("responses") or {} for t in tasks}
    if all({str(d) for d in both[t]} <= set(map(str, responses[t])) for t in tasks):
        return ({t: {d: responses[t].get(str(d), responses[t].get(d)) for d in both[t]} for t in tasks},
                {t: {d: dev.responses[t][d] for d in both[t]} for t in tasks})
    pick = lambda items, t: [i for i in items if i[0] in both[t]]  # noqa: E731
    return ({t: pick(run.host[t]["items"], t) for t in tasks},
            {t: pick(scores[t]["items"], t) for t in tasks})


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
