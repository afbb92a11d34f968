"""The build config's schema: every key of ``[build]``, ``[stage.NAME]`` and ``[gates]``.

One line per key: its type (``edgebuild.core.schema``'s strict types and ranges), its default
and its description; ``edgebuild config docs`` renders them as ``docs/config.md``. Names are
checked against the registries (benchmarks, compression methods, exporters, expert domains)
with a did-you-mean suggestion. Defaults follow the seed's gate table (core 98/95/90 %, expert
98/93/88 %, cumulative >= 84 %) and its critical-failure rules.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import Field, Strict, field_validator, model_validator

from edgebuild.core.schema import (
    NOT_LISTED, Bool, Fraction, KeyProblem, NonNegativeInt, PositiveFloat, PositiveInt, Probability, Str,
    names_from, schema, unknown_name,
)

PROFILES = ("smoke", "quick", "reduced", "full")      # smallest first (as edgebuild.bench.profiles)
LADDER = ("baseline", "seedlm", "vptq", "hyper")
RETENTION_KINDS = ("raw", "chance_normalised")
SOURCES = ("previous", "baseline")
SCOPES = ("weights", "leftovers")
Profile = Literal["smoke", "quick", "reduced", "full"]
Confidence = Annotated[float, Strict(), Field(gt=0, lt=1)]


def _benchmarks() -> list[str]:
    from edgebuild.bench import benchmarks
    return benchmarks.names()


def _methods() -> list[str]:
    from edgebuild.compress import methods
    return methods.names()


def _exporters() -> list[str]:
    from edgebuild.export import exporters
    return exporters.names()


def _executors() -> list[str]:
    from edgebuild.core.executors import executors
    return executors.names()


def _domains() -> list[str]:
    from edgebuild.bench.suite import EXPERT_DOMAINS, GENERAL
    return [GENERAL, *EXPERT_DOMAINS]


BENCHMARK = names_from("benchmark", _benchmarks)
BENCHMARKS = names_from("benchmark", _benchmarks, many=True)
METHOD = names_from("compression method", _methods)
EXPORTER = names_from("exporter", _exporters)
EXECUTOR = names_from("executor", _executors)
DOMAINS = names_from("expert domain", _domains, many=True)


@schema
class StageConfig:
    """``[stage.NAME]``: one compression stage: which method, its knobs, what it starts from."""

    method: Str = Field("rtn", description="compression method (`edgebuild methods` lists them)", json_schema_extra=METHOD)
    knobs: dict[Str, Any] = Field(default_factory=dict, description="the method's knobs; a new method starts from its own defaults")
    source: Literal["previous", "baseline"] = Field("previous", description="`previous`: the last passed stage's weights; `baseline`: the uncompressed model's")
    include_embeddings: Bool = Field(False, description="compress the (tied) embedding matrix too")
    scope: Literal["weights", "leftovers"] = Field("weights", description="`weights`: the decoder's linear weights; `leftovers`: keep the source's compressed records, compress what it left in float")
    space: dict[Str, list] | None = Field(None, description="the search's knob space: knob -> values from most compressed to least (not set: the method's own; `edgebuild methods` shows it)")
    order: list[Str] | None = Field(None, description="which knob of `space` the search moves first (not set: the method's own order)")
    fallback_layers: list[PositiveInt] = Field(default_factory=lambda: [2, 4], description="after a setting fails: keep its N most sensitive decoder layers (by KL, one layer at a time) at the fallback encoding, each N in turn ([]: none)")
    fallback_knobs: dict[Str, Any] = Field(default_factory=lambda: {"bits": 8, "group_size": 32}, description="`rtn` knobs of the layers kept by `fallback_layers`")


def _merged(default: dict):
    """A before-validator laying a table of per-stage values over ``default``."""
    def merge(cls, value):
        return {**default, **value} if isinstance(value, dict) else value
    return classmethod(merge)


CORE = {"seedlm": 0.98, "vptq": 0.95, "hyper": 0.90}
EXPERT = {"seedlm": 0.98, "vptq": 0.93, "hyper": 0.88}
EUDAIMONIA = {"seedlm": 0.65, "vptq": 0.65, "hyper": 0.60}
KL_MAX = {"seedlm": 0.5, "vptq": 0.75, "hyper": 1.0}
PER_STAGE = ("core", "expert", "eudaimonia", "kl_max")


@schema
class GateConfig:
    """``[gates]``: thresholds. Retention is a fraction of the reference stage's score; a
    per-stage table lays its entries over the defaults."""

    core: dict[Str, Fraction] = Field(default_factory=lambda: dict(CORE), description="per stage: minimum retention of each core benchmark")
    expert: dict[Str, Fraction] = Field(default_factory=lambda: dict(EXPERT), description="per stage: minimum retention of each expert benchmark")
    cumulative: Fraction = Field(0.84, description="minimum mean core retention against the baseline")
    critical_core_floor: Fraction = Field(0.80, description="a core benchmark below this retention is a critical failure")
    critical_mmlu_gsm8k_drop: Probability = Field(0.20, description="MMLU + GSM8K combined drop above this is a critical failure")
    critical_eudaimonia: Probability = Field(0.50, description="a eudaimonia rule scoring below this is a critical failure")
    critical_expert_drop: Probability = Field(0.25, description="the primary expert benchmark (the first expert benchmark of build.tasks) dropping more than this is a critical failure")
    eudaimonia: dict[Str, Probability] = Field(default_factory=lambda: dict(EUDAIMONIA), description="per stage: minimum overall eudaimonia score")
    retention: Literal["raw", "chance_normalised"] = Field("chance_normalised", description="which retention the thresholds apply to")
    kl_max: dict[Str, PositiveFloat] = Field(default_factory=lambda: dict(KL_MAX), description="per stage: maximum KL divergence of next-token distributions against the baseline")
    confidence: Confidence = Field(0.95, description="bootstrap interval level")
    bootstrap: PositiveInt = Field(1000, description="bootstrap resamples")
    on_inconclusive: Literal["fail", "pass"] = Field("fail", description="verdict of a check whose interval straddles its threshold")
    adaptive_max_items: NonNegativeInt = Field(800, description="an inconclusive retention samples up to this many items (0: off)")
    device_budgets: Bool = Field(True, description="the target's latency/memory/size budgets gate too")
    device_agreement: Fraction = Field(0.9, description="minimum share of items the device predicts as the host does")
    device_loglik_tolerance: PositiveFloat = Field(0.05, description="maximum |log-likelihood difference| of any answer per answer token, host vs device, in nats, for a runtime computing in float")
    device_loglik_tolerance_int8: PositiveFloat = Field(0.5, description="the same for a runtime with int8 activations (MatMulNBits accuracy_level 4), whose rounding the host's float arithmetic does not reproduce")
    min_shrink: Probability = Field(0.05, description="a passing stage is preferred over the one chosen before it only when it shrinks the deployed bytes by this share")

    _merge_core = field_validator("core", mode="before")(_merged(CORE))
    _merge_expert = field_validator("expert", mode="before")(_merged(EXPERT))
    _merge_eudaimonia = field_validator("eudaimonia", mode="before")(_merged(EUDAIMONIA))
    _merge_kl_max = field_validator("kl_max", mode="before")(_merged(KL_MAX))


DEFAULT_STAGES = {
    # Each stage runs the method it is named after; Hyper-Compression compresses what VPTQ left in
    # floating point (the embedding matrix). A stage named after another method runs that method.
    "seedlm": StageConfig(method="seedlm"),
    "vptq": StageConfig(method="vptq"),
    "hyper": StageConfig(method="hyper", scope="leftovers"),
}


def default_stage(name: str) -> StageConfig:
    """The settings of a stage without a ``[stage.NAME]`` table."""
    if name in DEFAULT_STAGES:
        return dataclasses.replace(DEFAULT_STAGES[name], knobs=dict(DEFAULT_STAGES[name].knobs))
    return StageConfig(method=name)


@schema
class BuildConfig:
    """``[build]`` (and the ``stage``/``gates`` tables): what a build runs and gates on."""

    stages: list[Str] = Field(default_factory=lambda: list(LADDER), description="the stage ladder, `baseline` first; each other stage is a default stage (seedlm, vptq, hyper), a compression method's name, or has a `[stage.NAME]` table")
    profile: Profile = Field("reduced", description="benchmark size: smoke (a few items), quick (50 per task), reduced (200 per task, the default), full")
    tasks: list[Str] | None = Field(None, description="benchmarks every stage is gated on (not set: the core suite and the expert benchmarks of `experts` that can run; a narrower list is named in the manifest's gates_not_evaluated)", json_schema_extra=BENCHMARKS)
    experts: list[Str] = Field(default_factory=lambda: ["general"], description="the model's expert domains; `edgebuild bench` runs their expert benchmarks (general: every domain)", json_schema_extra=DOMAINS)
    device_tasks: list[Str] | None = Field(None, description="benchmarks the device scores too, a subset of `tasks` (not set: all of them; []: none)", json_schema_extra=BENCHMARKS)
    device_profile: Profile = Field("reduced", description="items the device scores (a subset of the host's, same seed)")
    eudaimonia: Bool = Field(True, description="score the eudaimonia scenarios on every stage")
    eudaimonia_scenarios: Str = Field("", description="a JSONL of your own scenarios (empty: the shipped set)")
    edge_task: Str = Field("", description="a benchmark of `tasks` whose accuracy must lie in the 70-80 % edge band (empty: off)", json_schema_extra=BENCHMARK)
    seed: NonNegativeInt = Field(0, description="seed of every sample, draw and search")
    calibration_texts: NonNegativeInt = Field(32, description="calibration texts for methods that use them (0: none)")
    exporter: Str = Field("onnx", description="exporter of the device graph", json_schema_extra=EXPORTER)
    device: Bool = Field(True, description="run the device steps (false, or `--no-device`: the device checks are skipped and no stage is validated on the target)")
    max_trials: PositiveInt = Field(4, description="the search's attempts per stage at most (`--max-trials`)")
    time_budget_s: PositiveFloat | None = Field(None, description="seconds of the build after which no stage starts another attempt (`--time-budget`; not set: no limit)")
    torch_device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where torch compresses and scores on the host (`--device`; auto: cuda when torch sees a GPU, else cpu; cuda without one is an error)")
    executor: Str = Field("local", description="where independent work (the compression of a stage's next search trials, the benchmark shards of a stage, the builds of several targets of `all --target a,b`) runs (`--executor`): local, or ray (`pip install edgebuild[ray]`)", json_schema_extra=EXECUTOR)
    ray_address: Str = Field("", description="the Ray cluster of `executor = \"ray\"` (`--ray-address`; empty: $RAY_ADDRESS, else a Ray instance started on this machine)")
    allow_unsandboxed_code: Bool = Field(False, description="run generated code (HumanEval, MBPP) without isolation when no sandbox (bubblewrap) works here; same as `--allow-unsandboxed-code`")
    stage: dict[Str, StageConfig] = Field(default_factory=dict, description="`[stage.NAME]` tables", json_schema_extra=NOT_LISTED)
    gates: GateConfig = Field(default_factory=GateConfig, description="the `[gates]` table", json_schema_extra=NOT_LISTED)
    source_file: Str = Field("<defaults>", description="the file this config came from (not a key)", json_schema_extra=NOT_LISTED)

    @field_validator("stages")
    @classmethod
    def _ladder(cls, stages: list[str]) -> list[str]:
        if not stages or stages[0] != "baseline":
            raise KeyProblem((), "start with 'baseline'", stages)
        duplicates = sorted({s for s in stages if stages.count(s) > 1})
        if duplicates:
            raise KeyProblem((), f"name each stage once ({', '.join(duplicates)} repeated)", stages)
        return stages

    @model_validator(mode="after")
    def _names(self):
        _check_names(self)
        return self

    def stage_config(self, name: str) -> StageConfig:
        """The settings of stage ``name``: its table, else its defaults."""
        return self.stage.get(name) or default_stage(name)

    def validate(self) -> "BuildConfig":
        """Check every value again (after changes such as CLI overrides) and each stage's knobs
        against its method; raise ``ConfigError`` naming the file, key and allowed values."""
        from edgebuild.build.config import check_knobs, config_key
        from edgebuild.core.errors import ConfigError
        from edgebuild.core.schema import load
        load(BuildConfig, dataclasses.asdict(self), self.source_file, ConfigError, config_key)
        check_knobs(self)
        return self


def _check_names(cfg: BuildConfig) -> None:
    """Every name in the config is one the registries know (KeyProblem with did-you-mean)."""
    from edgebuild.bench import benchmarks
    from edgebuild.bench.suite import EXPERT_DOMAINS, GENERAL
    from edgebuild.compress import methods
    from edgebuild.export import exporters
    for i, task in enumerate(cfg.tasks or []):
        if task not in benchmarks:
            raise unknown_name(("tasks", i), "benchmark", task, benchmarks.names())
    _check_subset(cfg)
    if not cfg.experts:
        raise KeyProblem(("experts",), f"name at least one expert domain ({GENERAL}, "
                         f"{', '.join(EXPERT_DOMAINS)})", cfg.experts)
    for i, domain in enumerate(cfg.experts):
        if domain != GENERAL and domain not in EXPERT_DOMAINS:
            raise unknown_name(("experts", i), "expert domain", domain, [GENERAL, *EXPERT_DOMAINS])
    if cfg.exporter not in exporters:
        raise unknown_name(("exporter",), "exporter", cfg.exporter, exporters.names())
    for name, table in cfg.stage.items():
        if table.method not in methods:
            raise unknown_name(("stage", name, "method"), "compression method", table.method, methods.names())
    known = set(DEFAULT_STAGES) | set(methods.names()) | set(cfg.stage)
    for i, name in enumerate(cfg.stages[1:], start=1):
        if name not in known:
            problem = unknown_name(("stages", i), "stage", name, known)
            problem.must += f" or have a [stage.{name}] table naming its method"
            raise problem
    _check_per_stage(cfg, known)


def _check_subset(cfg: BuildConfig) -> None:
    if cfg.tasks is None:          # the default suite: checked when the build resolves it
        return
    for i, task in enumerate(cfg.device_tasks or []):
        if task not in cfg.tasks:
            raise unknown_name(("device_tasks", i), "benchmark of build.tasks", task, cfg.tasks)
    if cfg.edge_task and cfg.edge_task not in cfg.tasks:
        raise unknown_name(("edge_task",), "benchmark of build.tasks", cfg.edge_task, cfg.tasks)


def _check_per_stage(cfg: BuildConfig, known: set) -> None:
    for key in PER_STAGE:
        for stage in getattr(cfg.gates, key):
            if stage not in known:
                raise unknown_name(("gates", key, stage), "compressed stage", stage, known)
