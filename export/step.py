"""The export steps: the model's graph (once per model architecture) and each stage's check of
that graph, loaded with the stage's weights, against the torch model carrying the same weights."""
from __future__ import annotations

import json
from pathlib import Path

from edgebuild.core.cache import code_version, digest
from edgebuild.core.steps import BuildContext, StageRun, Step


class GraphStep(Step):
    """The device graph of the model (the same for every stage: weights are bound at load time)."""

    name = "graph"

    def key(self, ctx: BuildContext, run: StageRun) -> str:
        return digest("graph", arch_fingerprint(ctx.ref), ctx.config.exporter, code_version("export"))

    def run(self, ctx: BuildContext, run: StageRun, work: Path) -> dict:
        from edgebuild.export import exporters
        model, tok = ctx.models.base()
        with ctx.progress.step("export graph"):
            return exporters.get(ctx.config.exporter)().export(ctx.models.on_cpu(model), tok, work)

    def apply(self, ctx: BuildContext, run: StageRun, record: dict, entry: Path | None) -> None:
        """Nothing to record per stage: the device step and the manifest read the graph's files."""


class VerifyStep(Step):
    """Logits of the exported graph with the stage's weights against torch, on fixed prompts."""

    name = "verify"
    needs = ("pack", "graph")

    def key(self, ctx: BuildContext, run: StageRun) -> str:
        return digest("verify", run.keys["pack"], run.keys["graph"], code_version("export", "device_agent"))

    def run(self, ctx: BuildContext, run: StageRun, work: Path) -> dict:
        from edgebuild.export import exporters
        state = ctx.models.decoded(run)
        model, tok = ctx.models.for_stage(run)
        with ctx.progress.step(f"verify export {run.stage}"):
            return exporters.get(ctx.config.exporter)().verify(graph_dir(ctx, run), state,
                                                               ctx.models.on_cpu(model), tok)

    def apply(self, ctx: BuildContext, run: StageRun, record: dict, entry: Path | None) -> None:
        run.verify = record


def graph_dir(ctx: BuildContext, run: StageRun) -> Path:
    """The directory holding the graph files of ``run``'s build."""
    return ctx.cache.path("graph", run.keys["graph"])


def arch_fingerprint(ref) -> str:
    """What the graph depends on: the model's config.json (its weights do not matter)."""
    if ref.kind == "tiny-random":
        return ref.fingerprint
    cfg_file = Path(ref.path) / "config.json" if Path(ref.path).is_dir() else None
    if cfg_file and cfg_file.exists():
        return digest(json.loads(cfg_file.read_text()))
    return ref.fingerprint
