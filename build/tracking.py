"""Log a finished build to Weights & Biases, offline unless the user configures otherwise.

The mode is, in order: the ``mode`` argument, ``WANDB_MODE``, then ``"offline"``; an offline run is
written under the build directory (``<out>/<target>/wandb/offline-run-*``) and can be uploaded later
with ``wandb sync``. Tracking never fails a build: any error from wandb becomes a logged warning.

Metric names (one value per stage, the stage's last attempt)::

    {stage}/core/{bench}, {stage}/expert/{bench}     score on the benchmark
    {stage}/retention/{bench}                         score / baseline score
    {stage}/degradation/{bench}                       1 - retention (the gates' "drop")
    {stage}/edge_of_chaos/..., {stage}/eudaimonia/... numbers from the manifest, when measured
    {stage}/size_mb, {stage}/bits_per_weight, {stage}/kl, {stage}/top1_agreement, {stage}/passed,
    {stage}/num_failed_checks, {stage}/latency/{decode_ms_per_token_p50,...}
    model_size_mb, compression_ratio, bits_per_weight, overall_passed, num_failed_benchmarks, exit_code
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from pathlib import Path

from edgebuild.build.plots import compression_ratio, final_stages, label

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "edgebuild"
LATENCY_KEYS = ("decode_ms_per_token_p50", "decode_ms_per_token_p95", "prefill_ms_p50", "decode_tokens_per_s",
                "peak_rss_mb")


def resolve_mode(mode: str | None = None) -> str:
    """The wandb mode to use: the argument, else ``WANDB_MODE``, else ``"offline"``."""
    return mode or os.environ.get("WANDB_MODE") or "offline"


def task_kinds(manifest: dict) -> dict:
    """``{task: "core" | "expert"}`` for every benchmarked task."""
    expert = set(manifest.get("expert_benchmarks") or {})
    for st in manifest.get("stages", []):
        for c in (st.get("gate") or {}).get("checks", []):
            if c.get("group") == "expert":
                expert.add(c["name"].split("/", 1)[-1])
    tasks = {t for st in manifest.get("stages", []) for t in (st.get("scores") or {})}
    return {t: "expert" if t in expert else "core" for t in sorted(tasks)}


def _flatten(prefix: str, obj, out: dict) -> None:
    """Numbers (booleans as 0/1) of nested dicts and short lists under ``prefix/key/...``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}/{k}", v, out)
    elif isinstance(obj, (list, tuple)) and len(obj) <= 8:
        for i, v in enumerate(obj):
            _flatten(f"{prefix}/{i}", v, out)
    elif isinstance(obj, bool):
        out[prefix] = int(obj)
    elif isinstance(obj, (int, float)):
        out[prefix] = obj


def _measured(manifest: dict, st: dict, key: str):
    """A stage's ``edge_of_chaos``/``eudaimonia`` section; the build-level one belongs to the shipped stage."""
    section = st.get(key)
    unmeasured = not isinstance(section, dict) or section.get("measured") is False
    if unmeasured and st["stage"] == manifest.get("compression_level"):
        section = manifest.get(key)
    if not isinstance(section, dict) or section.get("measured") is False:
        return None
    return {k: v for k, v in section.items() if k != "measured"}


def stage_metrics(manifest: dict, st: dict, kinds: dict) -> dict:
    """The metrics of one stage attempt, named ``{stage}/...``."""
    s, out = st["stage"], {}
    for task, score in sorted((st.get("scores") or {}).items()):
        if task == "eudaimonia":          # logged under {stage}/eudaimonia/... below
            continue
        out[f"{s}/{kinds.get(task, 'core')}/{task}"] = score
        ret = (st.get("retention_vs_baseline") or {}).get(task)
        if ret is not None:
            out[f"{s}/retention/{task}"] = ret
            out[f"{s}/degradation/{task}"] = 1.0 - ret
    for key in ("edge_of_chaos", "eudaimonia"):
        section = _measured(manifest, st, key)
        if section:
            _flatten(f"{s}/{key}", section, out)
    out.update(_stage_facts(st))
    return out


def _stage_facts(st: dict) -> dict:
    s, quality, lat = st["stage"], st.get("quality") or {}, st.get("latency") or {}
    size = st.get("size_mb") if st.get("bytes") is not None else None     # a skipped stage has no artifact
    facts = {f"{s}/size_mb": size, f"{s}/bits_per_weight": st.get("bits_per_weight"),
             f"{s}/kl": quality.get("kl"), f"{s}/top1_agreement": quality.get("top1_agreement"),
             f"{s}/passed": int(st.get("status") == "passed"), f"{s}/num_failed_checks": len(_failed_checks(st))}
    facts.update({f"{s}/latency/{k}": lat.get(k) for k in LATENCY_KEYS})
    return {k: v for k, v in facts.items() if v is not None}


def _failed_checks(st: dict) -> list:
    return [c for c in (st.get("gate") or {}).get("checks", []) if c.get("verdict") == "fail"]


def failed_benchmarks(manifest: dict) -> set:
    """Benchmarks with a failed check (retention or critical) in the last attempt of any stage."""
    out = set()
    for st in final_stages(manifest):
        tasks = set(st.get("scores") or {})
        for c in _failed_checks(st):
            parts = c["name"].split("/")
            if c.get("group") == "critical" and len(parts) > 1 and parts[1] == "eudaimonia":
                out.add("eudaimonia")
            out.update(t for t in parts[-1].split("+") if t in tasks)
    return out


def metrics(manifest: dict) -> dict:
    """Every metric of a build: per stage (last attempt) and the build-level summary."""
    kinds = task_kinds(manifest)
    out = {}
    for st in final_stages(manifest):
        out.update(stage_metrics(manifest, st, kinds))
    top = {"model_size_mb": manifest.get("size_mb"), "compression_ratio": manifest.get("compression_ratio"),
           "bits_per_weight": manifest.get("bits_per_weight"), "exit_code": manifest.get("exit_code"),
           "overall_passed": bool((manifest.get("quality_gates") or {}).get("passed")),
           "num_failed_benchmarks": len(failed_benchmarks(manifest))}
    out.update({k: v for k, v in top.items() if v is not None})
    return out


def stage_table(manifest: dict) -> tuple:
    """``(columns, rows)``: one row per stage attempt, for a side-by-side comparison."""
    tasks = sorted(task_kinds(manifest))
    columns = ["stage", "attempt", "method", "reference_method", "source", "knobs", "status", "note", "bytes",
               "size_mb", "bits_per_weight", "compression_ratio", "kl", "top1_agreement", *LATENCY_KEYS,
               "failed_checks", *(f"score/{t}" for t in tasks), *(f"retention/{t}" for t in tasks)]
    return columns, [_table_row(manifest, st, tasks) for st in manifest.get("stages", [])]


def _table_row(manifest: dict, st: dict, tasks: list) -> list:
    quality, lat = st.get("quality") or {}, st.get("latency") or {}
    failed = "; ".join(c["name"] for c in _failed_checks(st))
    return [st["stage"], st.get("attempt", 0) + 1, st.get("method"), bool(st.get("reference_method")),
            st.get("source") or "", json.dumps(st.get("knobs") or {}, sort_keys=True), st.get("status"),
            st.get("note") or "", st.get("bytes"), st.get("size_mb"), st.get("bits_per_weight"),
            compression_ratio(manifest, st), quality.get("kl"), quality.get("top1_agreement"),
            *(lat.get(k) for k in LATENCY_KEYS), failed,
            *((st.get("scores") or {}).get(t) for t in tasks),
            *((st.get("retention_vs_baseline") or {}).get(t) for t in tasks)]


def artifact_name(kind: str, manifest: dict) -> str:
    """A wandb-legal artifact name: ``{kind}-{model}-{target}``."""
    raw = f"{kind}-{Path(str(manifest.get('model', 'model'))).name}-{manifest.get('target', 'target')}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", raw)


def log_build(manifest_path: Path, *, package_path: Path | None = None, project: str | None = None,
              entity: str | None = None, mode: str | None = None, run_name: str | None = None,
              plots: bool = True) -> Path | None:
    """Log the build whose manifest is at ``manifest_path``; return the wandb run directory.

    Returns None when tracking is disabled or wandb failed (the failure is logged as a warning; it
    never raises). The run directory is ``<build dir>/wandb/offline-run-...`` in offline mode.
    """
    mode = resolve_mode(mode)
    if mode == "disabled":
        return None
    t0 = time.perf_counter()
    try:
        run_dir = _log(Path(manifest_path), package_path, project, entity, mode, run_name, plots)
    except Exception as e:  # noqa: BLE001 - tracking must never fail a build
        log.warning("W&B logging skipped: %s: %s", type(e).__name__, e)
        return None
    log.info("W&B run (%s) written to %s in %.1f s", mode, run_dir, time.perf_counter() - t0)
    return run_dir


def _log(manifest_path: Path, package_path, project, entity, mode, run_name, plots) -> Path:
    import wandb
    manifest = json.loads(manifest_path.read_text())
    build_dir = manifest_path.parent
    settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, x_disable_machine_info=True,
                              disable_git=True, save_code=False, init_timeout=60)
    run = wandb.init(project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, entity=entity,
                     name=run_name or f"{manifest.get('model')}-{manifest.get('target')}", mode=mode,
                     dir=str(build_dir), config=run_config(manifest), job_type="build", settings=settings,
                     reinit="create_new")
    try:
        _record(wandb, run, manifest, build_dir, package_path, plots)
    finally:
        run.finish()
        if wandb.run is None:      # no other run open in this process: wait until the files are written
            wandb.teardown()
    return Path(run.dir).parent


def run_config(manifest: dict) -> dict:
    """The run's config: what was built, for whom, how."""
    keys = ("model", "model_fingerprint", "target", "profile", "tasks", "compression_level", "edgebuild_version")
    cfg = {k: manifest.get(k) for k in keys}
    cfg["stages"] = {label(st): {"method": st.get("method"), "knobs": st.get("knobs"), "source": st.get("source")}
                     for st in manifest.get("stages", [])}
    return cfg


def _record(wandb, run, manifest: dict, build_dir: Path, package_path, plots: bool) -> None:
    values = metrics(manifest)
    columns, rows = stage_table(manifest)
    payload = dict(values, stage_comparison=wandb.Table(columns=columns, data=rows))
    if plots:
        payload.update(_plot_images(wandb, manifest))
    run.log(payload)
    run.summary.update(values)
    report = wandb.Artifact(artifact_name("manifest", manifest), type="build-manifest",
                            metadata={k: values[k] for k in ("compression_ratio", "overall_passed") if k in values})
    for name in ("manifest.json", "report.md", "report.html"):
        if (build_dir / name).is_file():
            report.add_file(str(build_dir / name), name=name)
    run.log_artifact(report)
    if package_path is not None:
        pkg = wandb.Artifact(artifact_name("package", manifest), type="package")
        pkg.add_file(str(package_path), name=Path(package_path).name)
        run.log_artifact(pkg)


def _plot_images(wandb, manifest: dict) -> dict:
    from PIL import Image
    from edgebuild.build.plots import all_plots
    return {f"plots/{name}": wandb.Image(Image.open(io.BytesIO(png)), caption=name.replace("_", " "))
            for name, png in all_plots(manifest).items()}
