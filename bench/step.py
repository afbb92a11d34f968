"""The host step: a stage's benchmarks (core and expert suite, eudaimonia scenarios) and its
output-distribution quality against the baseline, all on the host's torch model of the stage."""
from __future__ import annotations

from pathlib import Path

from edgebuild.core.cache import code_version, digest
from edgebuild.core.data import data_fingerprint
from edgebuild.core.errors import DataError
from edgebuild.core.files import sha256_file
from edgebuild.core.steps import BuildContext, StageRun, Step


class HostStep(Step):
    """Record: ``{"results": {task: result}, "quality": {"kl", "top1_agreement", "ppl_ratio"}}``."""

    name = "host"
    needs = ("pack",)

    def key(self, ctx: BuildContext, run: StageRun) -> str:
        cfg = ctx.config
        return digest("host", run.keys["pack"], cfg.tasks, cfg.profile, data_fingerprint(ctx.data_dir),
                      cfg.seed, scenarios_fingerprint(cfg), code_version("bench"))

    def run(self, ctx: BuildContext, run: StageRun, work: Path) -> dict:
        from edgebuild.bench.runner import run_host
        cfg = ctx.config
        model, tok = ctx.models.for_stage(run)
        with ctx.progress.step(f"benchmarks {run.stage}") as update:
            results = run_host(model, tok, cfg.tasks, cfg.profile, ctx.data_dir, ctx.data_cache,
                               seed=cfg.seed, progress=update)
        results = {k: v.to_dict() for k, v in results.items()}
        if cfg.eudaimonia:
            results.update(_eudaimonia(ctx, run, model, tok))
        return {"results": results, "quality": _quality(ctx, model, tok)}

    def apply(self, ctx: BuildContext, run: StageRun, record: dict, entry: Path | None) -> None:
        run.host, run.quality = record["results"], record["quality"]


def _eudaimonia(ctx: BuildContext, run: StageRun, model, tok) -> dict:
    from edgebuild.bench import eudaimonia
    with ctx.progress.step(f"eudaimonia {run.stage}") as update:
        res = eudaimonia.run(model, tok, ctx.config.eudaimonia_scenarios or None, progress=update)
    return {eudaimonia.TASK_NAME: res.to_dict()}


def scenarios_fingerprint(cfg):
    """sha256 of the eudaimonia scenario file a build scores (None when it scores none)."""
    if not cfg.eudaimonia:
        return None
    from edgebuild.bench import eudaimonia
    path = Path(cfg.eudaimonia_scenarios) if cfg.eudaimonia_scenarios else eudaimonia.DEFAULT_PATH
    if not path.is_file():
        raise DataError(f"eudaimonia scenarios file {path} does not exist",
                        hint="set build.eudaimonia_scenarios to a JSONL file, or leave it empty")
    return sha256_file(path)


def _quality(ctx: BuildContext, model, tok) -> dict:
    """KL, top-1 agreement and perplexity ratio against the baseline's cached log-probabilities."""
    import numpy as np

    from edgebuild.bench import quality
    texts = ctx.texts.fixed()
    key = digest("reference-logprobs", ctx.ref.fingerprint, texts, code_version("bench"))
    entry = ctx.cache.get("reflogits", key)
    if entry is None:
        base, btok = ctx.models.base()
        with ctx.cache.build("reflogits", key) as work:
            np.save(work / "ref.npy", quality.reference_logprobs(base, btok, texts))
        entry = ctx.cache.path("reflogits", key)
    return quality.compare(model, tok, texts, np.load(entry / "ref.npy"))
