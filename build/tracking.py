"""Weights & Biases tracking of a build, live: each stage attempt is logged as it finishes.

``WandbTracker`` is a build listener (``BuildRequest.listeners``): ``start`` creates the run when
the build starts, ``stage_finished`` logs each stage attempt in its own step as soon as the
pipeline finishes it, ``finish`` logs what needs the whole build (the benchmark × stage table, a
line plot per benchmark, the report's plots, build-level numbers, artifacts) and closes the run.
The names are those of ``tracking_metrics``.

The run's ``.wandb`` file is written every ``FLUSH_S`` seconds, so a reader of an offline run
(``wandb leet``) sees each stage shortly after it finished. The mode is, in order: the ``mode``
argument, ``WANDB_MODE``, then ``"offline"``; an offline run is written under the build directory
(``<out>/<target>/wandb/offline-run-*``) and can be uploaded later with ``wandb sync``. Tracking
never fails a build: the first error from wandb becomes a logged warning and ends the tracking.
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
from pathlib import Path

from edgebuild.build.tracking_metrics import (artifact_name, build_metrics, mmlu_subjects, run_config,
                                              stage_metrics, stage_table)
from edgebuild.build.views import score_table

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "edgebuild"
FLUSH_S = 2.0        # seconds between writes of the run's .wandb file (wandb's own default: 15)


def resolve_mode(mode: str | None = None) -> str:
    """The wandb mode to use: the argument, else ``WANDB_MODE``, else ``"offline"``."""
    return mode or os.environ.get("WANDB_MODE") or "offline"


class WandbTracker:
    """A build listener logging to one W&B run: ``start``, ``stage_finished`` per attempt, ``finish``.

    Every method returns normally whatever wandb does: the first wandb error is logged as a warning
    and ends the tracking (the run is closed, later calls do nothing).
    """

    def __init__(self, build_dir: Path, *, mode: str | None = None, project: str | None = None,
                 entity: str | None = None, run_name: str | None = None, plots: bool = True,
                 flush_s: float = FLUSH_S):
        self.build_dir, self.mode = Path(build_dir), resolve_mode(mode)
        self.project, self.entity, self.run_name, self.plots = project, entity, run_name, plots
        self.flush_s = flush_s
        self.run = None
        self._baseline, self._last = None, {}      # the baseline's StageRun; the last attempt of each stage

    @property
    def run_dir(self) -> Path | None:
        """``<build dir>/wandb/offline-run-...`` (``run-...`` online) while the run is open."""
        return Path(self.run.dir).parent if self.run is not None else None

    def start(self, config: dict | None = None) -> bool:
        """Create the run with ``config``; False when tracking is disabled or wandb failed."""
        if self.mode == "disabled":
            return False
        try:
            self._init(config or {})
            return True
        except Exception as e:  # noqa: BLE001 - tracking must never fail a build
            return self._failed("start", e)

    def stage_finished(self, run, ctx=None) -> None:
        """Log one finished stage attempt (an ``edgebuild.core.steps.StageRun``) in its own step."""
        from edgebuild.build.manifest import stage_summary
        if run.stage == "baseline":
            self._baseline = run
        self._last[run.stage] = run
        self._guard("stage", lambda: self.run.log(stage_metrics(stage_summary(run, self._baseline))))

    def log_stage(self, st: dict, manifest: dict | None = None) -> None:
        """Log one stage attempt given as a manifest stage entry, in its own step."""
        self._guard("stage", lambda: self.run.log(stage_metrics(st, manifest)))

    def finish(self, manifest_path: Path, package_path: Path | None = None) -> Path | None:
        """Log the whole build's tables, plots, numbers and artifacts, close the run and return its
        directory (None when there is no run or wandb failed)."""
        run_dir, t0 = self.run_dir, time.perf_counter()
        if not self._guard("finish", lambda: self._finish(Path(manifest_path), package_path)):
            return None
        self._close(0)
        log.info("W&B run (%s) written to %s in %.1f s", self.mode, run_dir, time.perf_counter() - t0)
        return run_dir

    def abort(self, exit_code: int = 1) -> None:
        """Close the run of a build that stopped with an error."""
        self._close(exit_code)

    # -- internals --
    def _guard(self, what: str, fn) -> bool:
        if self.run is None:
            return False
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 - tracking must never fail a build
            return self._failed(what, e)

    def _failed(self, what: str, e: Exception) -> bool:
        log.warning("W&B logging skipped (%s): %s: %s", what, type(e).__name__, e)
        self._close(1)
        return False

    def _init(self, config: dict) -> None:
        import wandb
        self.build_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, x_disable_machine_info=True,
                                  disable_git=True, save_code=False, init_timeout=60,
                                  x_transaction_log_flush_interval=self.flush_s)
        self.run = wandb.init(project=self.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                              entity=self.entity, name=self.run_name, mode=self.mode, dir=str(self.build_dir),
                              config=config, job_type="build", settings=settings, reinit="create_new")

    def _finish(self, manifest_path: Path, package_path) -> None:
        import wandb
        manifest = json.loads(manifest_path.read_text())
        shipped = self._last.get(manifest.get("compression_level"))
        values = build_metrics(manifest, mmlu_subjects(shipped.host) if shipped else None)
        self.run.config.update(run_config(manifest), allow_val_change=True)
        if self.run_name is None:
            self.run.name = f"{manifest.get('model')}-{manifest.get('target')}"
        images = _plot_images(wandb, manifest) if self.plots else {}
        self.run.log({**values, **_tables(wandb, manifest), **images})
        self.run.summary.update(values)
        _log_artifacts(wandb, self.run, manifest, manifest_path.parent, values, package_path)

    def _close(self, exit_code: int) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
            import wandb
            if wandb.run is None:      # no other run open in this process: wait until the files are written
                wandb.teardown()
        except Exception as e:  # noqa: BLE001
            log.warning("W&B run not closed cleanly: %s: %s", type(e).__name__, e)


def _tables(wandb, manifest: dict) -> dict:
    """The benchmark × stage table, a line plot of each benchmark's score by stage, the attempts table."""
    table = score_table(manifest)
    out = {"benchmark_by_stage": wandb.Table(columns=table.header(), data=table.rows())}
    for b in table.benchmarks:
        points = wandb.Table(columns=["stage_index", "score", "stage"],
                             data=[[i, score, name] for i, name, score, _ in table.series(b)])
        out[f"score_by_stage/{b}"] = wandb.plot.line(points, "stage_index", "score", title=f"{b}: score by stage")
    columns, rows = stage_table(manifest)
    out["stage_comparison"] = wandb.Table(columns=columns, data=rows)
    return out


def _plot_images(wandb, manifest: dict) -> dict:
    from PIL import Image
    from edgebuild.build.plots import all_plots
    return {f"plots/{name}": wandb.Image(Image.open(io.BytesIO(png)), caption=name.replace("_", " "))
            for name, png in all_plots(manifest).items()}


def _log_artifacts(wandb, run, manifest: dict, build_dir: Path, values: dict, package_path) -> None:
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


def log_build(manifest_path: Path, *, package_path: Path | None = None, project: str | None = None,
              entity: str | None = None, mode: str | None = None, run_name: str | None = None,
              plots: bool = True) -> Path | None:
    """Log a finished build from its manifest alone (each stage attempt, then the whole build) to a
    new run; return the run directory, or None when tracking is disabled or wandb failed (a warning)."""
    manifest_path = Path(manifest_path)
    tracker = WandbTracker(manifest_path.parent, mode=mode, project=project, entity=entity,
                           run_name=run_name, plots=plots)
    if tracker.mode == "disabled":
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        log.warning("W&B logging skipped: cannot read %s: %s", manifest_path, e)
        return None
    if not tracker.start({"model": manifest.get("model"), "target": manifest.get("target")}):
        return None
    for st in manifest.get("stages", []):
        tracker.log_stage(st, manifest)
    return tracker.finish(manifest_path, package_path)
