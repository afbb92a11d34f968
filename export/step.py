"""The export steps: the model's graph (once per model architecture) and each stage's check of
that graph, loaded with the stage's weights, against the torch model carrying the same weights;
and the runtime step: each stage as the device executes it (a runtime directory in the target
spec's runtime encodings), with what deploying it costs in bytes and in quality."""
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
        model, tok = ctx.models.compressed(run)
        with ctx.progress.step(f"verify export {run.stage}"):
            return exporters.get(ctx.config.exporter)().verify(graph_dir(ctx, run), state,
                                                               ctx.models.on_cpu(model), tok)

    def apply(self, ctx: BuildContext, run: StageRun, record: dict, entry: Path | None) -> None:
        run.verify = record


RUNTIME_DIR = "runtime"


class RuntimeStep(Step):
    """The stage encoded into a runtime directory (``export.runtime_build.encode_stage``) from its
    own decoded weights: SeedLM, VPTQ and Hyper-Compression stages are thereby transcoded,
    deterministically, into the target spec's ``[runtime]`` encodings; the baseline, the reference
    every stage is judged against, is encoded in fp32. Record: transport (packed) and runtime bytes,
    the encoding of each tensor class, the runtime weights' sha256 and the runtime's agreement with
    torch carrying the deployed weights (``verify_runtime``; an ``ExportError`` when it does not
    compute what they say). What deploying costs in quality is the quality step's
    (``deployment``: KL(stage || stage as deployed))."""

    name = "runtime"
    needs = ("pack",)

    def key(self, ctx: BuildContext, run: StageRun) -> str:
        return digest("runtime", run.keys["pack"], ctx.ref.fingerprint, runtime_plan(ctx, run).to_dict(),
                      ctx.texts.fixed(), code_version("export", "device_agent"))

    def run(self, ctx: BuildContext, run: StageRun, work: Path) -> dict:
        from edgebuild.export.runtime_build import encode_stage
        plan, folder = runtime_plan(ctx, run), work / RUNTIME_DIR
        base, tok = ctx.models.base()
        with ctx.progress.step(f"encode runtime {run.stage} ({plan.label()})"):
            manifest = encode_stage(base, tok, folder, plan, records=ctx.models.records(run),
                                    meta={"stage": run.stage, "method": run.method, "knobs": run.knobs})
        with ctx.progress.step(f"verify runtime {run.stage}"):
            verify = _verify(ctx, run, folder)
        return {"label": manifest["label"], "encodings": manifest["encodings"], "knobs": manifest["knobs"],
                "bytes": manifest["runtime_bytes"], "weights_bytes": manifest["weights_bytes"],
                "transport_bytes": run.pack["bytes"], "weights_sha256": manifest["weights_sha256"],
                "requirements": manifest["requirements"], "encode_s": manifest["encode_s"], "verify": verify,
                "fallback": (ctx.runtime_plan or {}).get("notes", []) if run.stage != "baseline" else []}

    def apply(self, ctx: BuildContext, run: StageRun, record: dict, entry: Path | None) -> None:
        run.pack["runtime"] = dict(record, path=str(entry / RUNTIME_DIR))


def runtime_plan(ctx: BuildContext, run: StageRun):
    """The runtime plan of ``run``: the target spec's (as the device runs it, when the build asked
    the device: ``ctx.runtime_plan``), fp32 for the baseline (the reference)."""
    from dataclasses import replace

    from edgebuild.export.encodings import plan_from_spec
    plan = ctx.runtime_plan["plan"] if ctx.runtime_plan else plan_from_spec(ctx.target.runtime)
    return replace(plan, linear="fp32", embedding="fp32") if run.stage == "baseline" else plan


def _verify(ctx: BuildContext, run: StageRun, folder: Path) -> dict:
    """The runtime against torch carrying its deployed weights (``verify_runtime``), summarised."""
    from edgebuild.export.deployed import deployed_model
    from edgebuild.export.runtime_verify import verify_runtime
    stage, tok = ctx.models.compressed(run)
    result = verify_runtime(folder, deployed_model(stage, folder), tok, threads=ctx.target.runtime.threads)
    keep = ("max_abs_diff", "top1_agreement", "greedy_match", "int8_compute", "tolerances", "prompts", "steps")
    return {**{k: result[k] for k in keep}, "weights_max_abs_diff": result["weights"]["max_abs_diff"]}


def runtime_dir(run: StageRun) -> Path | None:
    """The runtime directory of ``run`` (None when the build encoded none)."""
    runtime = run.pack.get("runtime") or {}
    return Path(runtime["path"]) if runtime.get("path") else None


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
