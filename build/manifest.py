"""The build manifest (the seed's handoff spec plus exact bytes, bits/weight and sha256s).

Stage artifacts are copied from the cache into ``<out>/<target>/stages/<stage>/``; the manifest
lists each with its size and sha256, and is written atomically.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edgebuild.build.ladder import deployed_bytes
from edgebuild.core import __version__
from edgebuild.core.files import atomic_path, sha256_file, write_json_atomic

MB = 1e6


def final_runs(result) -> dict:
    """The last attempt of each stage, by name."""
    out = {}
    for run in result.runs:
        out[run.stage] = run
    return out


def _scores(run) -> dict:
    return {t: r["score"] for t, r in sorted(run.host.items())}


def _retention(run, base) -> dict:
    out = {}
    for t, r in sorted(run.host.items()):
        b = base.host.get(t, {}).get("score")
        out[t] = (r["score"] / b) if b else None
    return out


def latency(device: dict) -> dict:
    """The device's latency summary; for a device lost mid-step, the phase it was lost in and what
    it had measured before (``partial``: raw samples, never gated); on a labgrid group, the board
    it was measured on and what each board did (``board``, ``boards``)."""
    if not device or device.get("status") != "ok":
        out = {"measured": False, "status": (device or {}).get("status", "not run"),
               "error": (device or {}).get("error")}
        if out["status"] == "lost":
            out.update(after=device.get("after"), partial=device.get("partial") or {})
        return _boards(device, out)
    dec = np.asarray(device["decode_ms_per_token"], dtype=float)
    pre = np.asarray(device["prefill_ms"], dtype=float)
    return _boards(device, {
        "measured": True, "reconnects": device.get("reconnects", 0), "prefill_ms_p50": float(np.median(pre)),
        "decode_ms_per_token_p50": float(np.median(dec)),
        "decode_ms_per_token_p95": float(np.percentile(dec, 95)),
        "decode_tokens_per_s": float(1000.0 / np.median(dec)), "peak_rss_mb": device.get("peak_rss_mb"),
        "stage_rss_mb": device.get("stage_rss_mb"), "load_s": device.get("load_s"),
        "stored_bytes": device.get("stored_bytes"), "weights": device.get("weights"),
        "samples": {"prefill_ms": device["prefill_ms"], "decode_ms_per_token": device["decode_ms_per_token"]}})


def _boards(device: dict | None, out: dict) -> dict:
    """``out`` with the board a group's stage was measured on and what each of its boards did."""
    for key in ("board", "boards"):
        if (device or {}).get(key):
            out[key] = device[key]
    return out


def device_scores(device: dict) -> dict | None:
    """The device's own benchmark scores and their agreement with the host's, when it scored any."""
    if not device or not device.get("scores"):
        return None
    return {"profile": device.get("profile"), "agreement": device.get("agreement"),
            "excluded": device.get("excluded_tasks") or {},
            "tasks": {t: {"score": r["score"], "n": r["n"],
                          "host_score": (device.get("host_scores") or {}).get(t)}
                      for t, r in sorted(device["scores"].items())}}


def eudaimonia(run) -> dict:
    """The stage's eudaimonia result: overall score, per-rule scores and n."""
    r = run.host.get("eudaimonia")
    if not r:
        return {"measured": False, "reason": "not scored in this build (build.eudaimonia = false)"}
    return {"measured": True, "score": r["score"], "rules": r.get("rules", {}), "n": r.get("n")}


def edge_of_chaos(run) -> dict:
    """The stage's edge-of-chaos check (accuracy band on ``build.edge_task``), from its gate."""
    check = next((c for c in (run.gate or {}).get("checks", []) if c.get("group") == "edge"), None)
    if check is None:
        return {"measured": False, "reason": "no build.edge_task configured"}
    return {"measured": check["verdict"] != "not_run", "task": check["name"].split("/", 1)[-1],
            "accuracy": check.get("value"), "ci": check.get("ci"), "verdict": check["verdict"],
            "detail": check.get("detail")}


def runtime_summary(run) -> dict | None:
    """What the device executes for ``run``: the runtime encodings, transport (packed) and runtime
    bytes, the runtime weights' sha256, KL(stage || stage as deployed) beside the stage's own KL
    against the baseline, and the runtime's agreement with torch; None without a runtime."""
    runtime = run.pack.get("runtime")
    if not runtime:
        return None
    keep = ("label", "encodings", "knobs", "bytes", "weights_bytes", "transport_bytes", "weights_sha256",
            "verify", "requirements", "fallback")
    return {**{k: runtime.get(k) for k in keep}, "deployment": (run.quality or {}).get("deployment")}


def stage_summary(run, base) -> dict:
    stats = run.pack.get("stats", {})
    return {
        "stage": run.stage, "attempt": run.attempt, "status": run.status, "note": run.note,
        "method": run.method, "knobs": run.knobs, "source": run.source,
        "reference_method": run.pack.get("reference_method", False),
        "bytes": run.pack.get("bytes"), "size_mb": (run.pack.get("bytes") or 0) / MB,
        "deployed_bytes": deployed_bytes(run), "runtime": runtime_summary(run),
        "bits_per_weight": stats.get("bits_per_weight"), "bits_per_weight_all": stats.get("bits_per_weight_all"),
        "method_facts": run.pack.get("facts", {}),
        "scores": _scores(run), "retention_vs_baseline": _retention(run, base) if base else {},
        "quality": run.quality, "export_check": run.verify, "latency": latency(run.device),
        "device_scores": device_scores(run.device),
        "eudaimonia": eudaimonia(run), "edge_of_chaos": edge_of_chaos(run),
        "gate": run.gate, "trial": run.trial, "stopped": run.stopped,
        "device_validated": _device_ok(run),
    }


def link_artifacts(result, runs: dict) -> dict:
    """Copy each stage's artifacts out of the cache; return {stage: [artifact]} (a stage that
    stopped before its export has its packed weights only)."""
    out = {}
    for name, run in runs.items():
        if not run.pack:
            continue
        dest = result.out_dir / "stages" / name
        files = {"weights.ebpk": Path(run.pack["path"])}
        if run.pack.get("runtime"):
            from edgebuild.device_agent.runtime_dir import upload_files
            files.update({f"runtime/{n}": p for n, p in upload_files(run.pack["runtime"]["path"]).items()})
        if "graph" in run.keys:
            graph = result.out_dir.parent / "cache" / "graph" / run.keys["graph"]
            files.update({"model.onnx": graph / "model.onnx", "graph.json": graph / "graph.json"})
        out[name] = [_place(src, dest / fname, result.out_dir) for fname, src in files.items()]
    return out


def _place(src: Path, dst: Path, root: Path) -> dict:
    """Copy ``src`` to ``dst`` unless ``dst`` already holds the same bytes; never a hard link, so
    a later write to the outputs cannot change the cache (or the other way round)."""
    sha = sha256_file(src)
    if not (dst.is_file() and sha256_file(dst) == sha):
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    return {"path": str(dst.relative_to(root)), "bytes": dst.stat().st_size, "sha256": sha}


DEVICE_FACTS = ("arch", "platform", "cpu_model", "cores", "ram_total_mb", "python", "onnxruntime", "numpy")


def device_facts(runs: list) -> dict | None:
    """The target's machine as its agent reported it (CPU architecture, OS and C library, CPU
    model, cores, memory, Python, onnxruntime, numpy), from the first stage the device measured;
    None when it measured none."""
    for run in runs:
        info = (run.device or {}).get("info") or {}
        if info:
            return {key: info.get(key) for key in DEVICE_FACTS}
    return None


def _measurement(target) -> str:
    """``emulated`` (an emulated CPU: its timings gate nothing) or ``measured``."""
    return "emulated" if getattr(target, "emulated", False) else "measured"


def build_manifest(result) -> dict:
    from edgebuild.bench.suite import NOT_RUNNABLE, check_domains, expert_benchmarks

    runs = final_runs(result)
    base = runs.get("baseline")
    shipped = runs[result.shipped]
    artifacts = link_artifacts(result, runs)
    original = base.pack.get("bytes") if base else None
    size = shipped.pack.get("bytes")
    core = {t: r for t, r in shipped.host.items() if r.get("kind") == "core"}
    expert = {t: r for t, r in shipped.host.items() if r.get("kind") == "expert"}
    gate = shipped.gate or {}
    return {
        "edgebuild_version": __version__,
        "model": result.model_ref.spec,
        "model_fingerprint": result.model_ref.fingerprint,
        "target": result.target.name,
        "device_measurement": _measurement(result.target),
        "device_facts": device_facts(result.runs),
        "compression_level": result.shipped,
        "size_mb": size / MB if size else None, "size_bytes": size,
        "deployed_bytes": deployed_bytes(shipped), "runtime": runtime_summary(shipped),
        "original_size_mb": original / MB if original else None, "original_size_bytes": original,
        "compression_ratio": (original / size) if original and size else None,
        "bits_per_weight": shipped.pack.get("stats", {}).get("bits_per_weight"),
        "benchmarks": {"baseline": {t: base.host[t]["score"] for t in core} if base else {},
                       "final": {t: r["score"] for t, r in core.items()},
                       "retention": {t: v for t, v in _retention(shipped, base).items() if t in core}},
        "expert_benchmarks": _experts(expert, shipped, base),
        "expert_domains": check_domains(result.config.experts),
        "unavailable_benchmarks": {n: NOT_RUNNABLE[n] for n in expert_benchmarks(result.config.experts)
                                   if n in NOT_RUNNABLE},
        "edge_of_chaos": edge_of_chaos(shipped),
        "eudaimonia": eudaimonia(shipped),
        "quality_gates": {"passed": shipped.status == "passed",
                          "retries": sum(1 for r in result.runs if r.attempt > 0),
                          "checks": gate.get("checks", []), "reasons": gate.get("reasons", [])},
        "ready_for_edge_deployment": shipped.status == "passed" and _device_ok(shipped),
        "device_checks": _device_checks_state(result, shipped),
        "gates_not_evaluated": dict(getattr(result, "not_evaluated", {}) or {}),
        "search": search_summary(result),
        "compressed_ahead": dict(getattr(result, "compressed_ahead", {}) or {}),
        "recommended_hardware": {"target": result.target.name, "description": result.target.description},
        "latency": latency(shipped.device),
        "exit_code": int(result.exit_code),
        "stages": [stage_summary(r, base) for r in result.runs],
        "fallback_path": [f"{r.stage}#{r.attempt + 1}:{r.status}" for r in result.runs],
        "artifacts": artifacts,
        "profile": result.config.profile, "tasks": result.config.tasks,
        "torch_device": torch_device(result),
    }


def torch_device(result) -> str:
    """Where torch compresses and scores on the host in this build: ``cpu`` or ``cuda (GPU name)``."""
    from edgebuild.core.accel import describe
    return describe(getattr(result, "torch_device", "cpu"))


def _experts(expert: dict, shipped, base) -> dict:
    """Score, n, baseline score and retention of each expert benchmark of the shipped stage."""
    retention = _retention(shipped, base)
    return {t: {"score": r["score"], "n": r["n"],
                "baseline": base.host[t]["score"] if base and t in base.host else None,
                "retention": retention.get(t)} for t, r in expert.items()}


def search_summary(result) -> dict:
    """Every attempt of every compressed stage, in order: its setting, size, verdict and why."""
    out = {}
    for run in result.runs:
        if run.stage == "baseline" or run.status == "skipped":
            continue
        out.setdefault(run.stage, []).append({
            "attempt": run.attempt + 1, "knobs": run.knobs,
            "fallback_layers": (run.trial or {}).get("fallback_layers"),
            "bytes": run.pack.get("bytes"), "deployed_bytes": deployed_bytes(run),
            "kl": (run.quality or {}).get("kl"), "status": run.status,
            "stopped": run.stopped, "reasons": (run.gate or {}).get("reasons", [])})
    return out


def _device_checks_state(result, shipped) -> str:
    """``measured``, ``skipped`` (``--no-device`` or a partial build) or ``not run``."""
    if not getattr(result.config, "device", True):
        return "skipped: --no-device"
    if _device_ok(shipped):
        return "measured"
    device = shipped.device or {}
    why = {"lost": f"device lost during {device.get('after')}: {device.get('error')}",
           "unreachable": f"device unreachable: {device.get('error')}"}.get(device.get("status"))
    return "not run: the shipped stage is not validated on its target" + (f" ({why})" if why else "")


def _device_ok(run) -> bool:
    return bool(run.device) and run.device.get("status") == "ok"


def write_manifest(result) -> Path:
    path = result.out_dir / "manifest.json"
    write_json_atomic(path, build_manifest(result))
    return path
