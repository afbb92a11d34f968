"""Build configuration: dataclasses loaded from TOML, validated in one place.

Every error names the file, the key and the allowed values. Defaults follow the seed's gate table
(core 98/95/90 %, expert 98/93/88 %, cumulative ≥ 84 %) and its critical-failure rules.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgebuild.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROFILES = ("smoke", "reduced", "full")      # smallest first (as edgebuild.bench.profiles)
LADDER = ("baseline", "seedlm", "vptq", "hyper")
RETENTION_KINDS = ("raw", "chance_normalised")
SOURCES = ("previous", "baseline")
SCOPES = ("weights", "leftovers")


@dataclass
class StageConfig:
    """One compression stage: which method, its knobs, and what it starts from."""

    method: str = "rtn"
    knobs: dict = field(default_factory=dict)
    source: str = "previous"          # "previous": the last passed stage's weights; "baseline"
    include_embeddings: bool = False  # compress the (tied) embedding matrix too
    scope: str = "weights"            # "weights": the decoder's linear weights; "leftovers": keep the
                                      # source's compressed records, compress what it left in float
    space: dict | None = None         # knob -> values tried by the search (None: the method's own)
    order: list | None = None         # which knob of ``space`` moves first (None: the method's own)
    fallback_layers: list = field(default_factory=lambda: [2, 4])  # after a setting fails: keep its
                                      # N most sensitive decoder layers at 8-bit (rtn), N in turn
    fallback_knobs: dict = field(default_factory=lambda: {"bits": 8, "group_size": 32})


@dataclass
class GateConfig:
    """Thresholds. Retention is a fraction of the reference stage's score."""

    core: dict = field(default_factory=lambda: {"seedlm": 0.98, "vptq": 0.95, "hyper": 0.90})
    expert: dict = field(default_factory=lambda: {"seedlm": 0.98, "vptq": 0.93, "hyper": 0.88})
    cumulative: float = 0.84                 # mean core retention against the baseline
    critical_core_floor: float = 0.80        # any core benchmark below this retention: critical
    critical_mmlu_gsm8k_drop: float = 0.20   # MMLU + GSM8K combined drop: critical
    critical_eudaimonia: float = 0.50        # any eudaimonia rule below: critical
    critical_expert_drop: float = 0.25       # primary expert benchmark drop: critical
    eudaimonia: dict = field(default_factory=lambda: {"seedlm": 0.65, "vptq": 0.65, "hyper": 0.60})
    retention: str = "chance_normalised"     # which retention the thresholds apply to
    kl_max: dict = field(default_factory=lambda: {"seedlm": 0.5, "vptq": 0.75, "hyper": 1.0})
    confidence: float = 0.95                 # bootstrap interval level
    bootstrap: int = 1000                    # bootstrap resamples
    on_inconclusive: str = "fail"            # "fail" or "pass"
    adaptive_max_items: int = 800            # inconclusive retention: sample up to this many items (0: off)
    device_budgets: bool = True              # the target's latency/memory/size budgets gate too
    device_agreement: float = 0.9            # share of items the device predicts as the host does
    device_loglik_tolerance: float = 1.0     # largest |log-likelihood difference| host vs device
    min_shrink: float = 0.05                 # a stage must shrink the runtime bytes of the previous
                                             # passing stage by this share to be preferred


@dataclass
class BuildConfig:
    stages: list = field(default_factory=lambda: list(LADDER))
    profile: str = "reduced"
    tasks: list | None = None         # what gates (None: the core suite + the experts' benchmarks)
    experts: list = field(default_factory=lambda: ["general"])  # the model's expert domains
    device: bool = True               # run the device steps (false: --no-device, device gates skipped)
    max_trials: int = 4               # search: attempts per stage at most
    time_budget_s: float | None = None  # search: no new attempt of a stage after this many seconds
    device_tasks: list | None = None  # tasks the device scores too (None: all of tasks; [] none)
    device_profile: str = "reduced"   # items the device scores (a subset of the host's with the same seed)
    eudaimonia: bool = True           # score the eudaimonia scenarios on every stage
    eudaimonia_scenarios: str = ""    # a JSONL of your own scenarios ("" = the shipped set)
    edge_task: str = ""               # a host task whose accuracy must lie in the edge band ("" = off)
    seed: int = 0
    calibration_texts: int = 32
    exporter: str = "onnx"
    stage: dict = field(default_factory=dict)     # name -> StageConfig
    gates: GateConfig = field(default_factory=GateConfig)
    source_file: str = "<defaults>"

    def stage_config(self, name: str) -> StageConfig:
        return self.stage.get(name) or default_stage(name)

    def validate(self) -> "BuildConfig":
        """Check every value; raise ConfigError naming the file, key and allowed values."""
        where = self.source_file
        if not self.stages or self.stages[0] != "baseline":
            raise ConfigError(f"{where}: build.stages must start with 'baseline' (got {self.stages})")
        if len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"{where}: build.stages has duplicates: {self.stages}")
        _choice(where, "build.profile", self.profile, PROFILES)
        _choice(where, "build.device_profile", self.device_profile, PROFILES)
        for task in (self.device_tasks or []) if self.tasks is not None else []:
            if task not in self.tasks:
                raise ConfigError(f"{where}: build.device_tasks: {task!r} is not one of build.tasks "
                                  f"({', '.join(self.tasks)}); the device scores a subset of them")
        if self.edge_task and self.tasks is not None and self.edge_task not in self.tasks:
            raise ConfigError(f"{where}: build.edge_task = {self.edge_task!r} is not one of build.tasks "
                              f"({', '.join(self.tasks)})")
        _check_experts(where, self.experts)
        if not isinstance(self.max_trials, int) or isinstance(self.max_trials, bool) or self.max_trials < 1:
            raise ConfigError(f"{where}: build.max_trials = {self.max_trials!r} is not allowed "
                              "(allowed: an integer of at least 1)")
        if self.time_budget_s is not None and (not isinstance(self.time_budget_s, (int, float))
                                               or self.time_budget_s <= 0):
            raise ConfigError(f"{where}: build.time_budget_s = {self.time_budget_s!r} is not allowed "
                              "(allowed: a number of seconds above 0, or leave it out for no limit)")
        _choice(where, "gates.retention", self.gates.retention, RETENTION_KINDS)
        _choice(where, "gates.on_inconclusive", self.gates.on_inconclusive, ("fail", "pass"))
        for name in self.stages[1:]:
            self._validate_stage(where, name, self.stage_config(name))
        self._validate_gates(where)
        return self

    def _validate_stage(self, where, name, sc: StageConfig) -> None:
        from edgebuild.compress import methods
        if sc.method not in methods:
            raise ConfigError(f"{where}: stage.{name}.method: " + methods._unknown_message(sc.method))
        _choice(where, f"stage.{name}.source", sc.source, SOURCES)
        _choice(where, f"stage.{name}.scope", sc.scope, SCOPES)
        try:
            methods.get(sc.method).from_knobs(sc.knobs)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: stage.{name}.knobs: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{where}: stage.{name}.knobs: {e}") from None
        self._validate_search(where, name, sc, methods.get(sc.method))

    def _validate_search(self, where, name, sc: StageConfig, method) -> None:
        from edgebuild.compress.search import check_space
        if sc.space is not None or sc.order is not None:
            space = method.knob_space if sc.space is None else sc.space
            order = list(space) if sc.order is None else sc.order
            check_space(method, space, order, f"{where}: stage.{name}")
        counts = sc.fallback_layers
        if not isinstance(counts, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                                                   for n in counts):
            raise ConfigError(f"{where}: stage.{name}.fallback_layers = {counts!r} is not allowed "
                              "(allowed: a list of layer counts above 0, [] for none)")

    def _validate_gates(self, where) -> None:
        g = self.gates
        for key in ("core", "expert", "kl_max", "eudaimonia"):
            for stage, value in getattr(g, key).items():
                if not isinstance(value, (int, float)) or value < 0:
                    raise ConfigError(f"{where}: gates.{key}.{stage} must be a non-negative number, got {value!r}")
        for key in ("cumulative", "critical_core_floor", "confidence", "min_shrink"):
            value = getattr(g, key)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ConfigError(f"{where}: gates.{key} must be a number in [0, 1], got {value!r}")
        if not isinstance(g.device_agreement, (int, float)) or not 0 < g.device_agreement <= 1:
            raise ConfigError(f"{where}: gates.device_agreement = {g.device_agreement!r} is not allowed "
                              "(allowed: a share in (0, 1])")
        if not isinstance(g.device_loglik_tolerance, (int, float)) or g.device_loglik_tolerance <= 0:
            raise ConfigError(f"{where}: gates.device_loglik_tolerance = {g.device_loglik_tolerance!r} is not "
                              "allowed (allowed: a number of nats above 0)")


def _check_experts(where: str, experts) -> None:
    from edgebuild.bench.suite import check_domains
    if not isinstance(experts, list):
        raise ConfigError(f"{where}: build.experts must be a list of expert domains, got {experts!r}")
    try:
        check_domains(experts)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _choice(where: str, key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: {key} = {value!r} is not allowed (allowed: {', '.join(allowed)})")


DEFAULT_STAGES = {
    # Each stage runs the method it is named after; Hyper-Compression compresses what VPTQ left in
    # floating point (the embedding matrix). Any other stage name defaults to the reference method.
    "seedlm": StageConfig(method="seedlm"),
    "vptq": StageConfig(method="vptq"),
    "hyper": StageConfig(method="hyper", scope="leftovers"),
}


def default_stage(name: str) -> StageConfig:
    if name in DEFAULT_STAGES:
        return dataclasses.replace(DEFAULT_STAGES[name], knobs=dict(DEFAULT_STAGES[name].knobs))
    return StageConfig()


def load_config(path: str | Path | None, **overrides) -> BuildConfig:
    """Load a TOML build config (or the defaults), apply CLI overrides, validate."""
    raw, where = {}, "<defaults>"
    if path is not None:
        p = Path(path)
        where = str(p)
        raw = _read_toml(p)
    cfg = _from_dict(raw, where)
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    return cfg.validate()


def _read_toml(p: Path) -> dict:
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist", hint="check --config") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


def _from_dict(raw: dict, where: str) -> BuildConfig:
    _known(where, "", raw, {"build", "stage", "gates"})
    build = dict(raw.get("build", {}))
    _known(where, "build.", build, {f.name for f in dataclasses.fields(BuildConfig)} - {"stage", "gates", "source_file"})
    cfg = BuildConfig(**build, source_file=where)
    cfg.gates = _dataclass_from(GateConfig, raw.get("gates", {}), where, "gates.")
    for name, table in raw.get("stage", {}).items():
        base = dataclasses.asdict(default_stage(name))
        if "method" in table and table["method"] != base["method"]:
            base["knobs"] = {}
        base.update(table)
        cfg.stage[name] = _dataclass_from(StageConfig, base, where, f"stage.{name}.")
    return cfg


def _dataclass_from(cls, table: dict, where: str, prefix: str):
    _known(where, prefix, table, {f.name for f in dataclasses.fields(cls)})
    obj = cls()
    for key, value in table.items():
        default = getattr(obj, key)
        if isinstance(default, dict) and isinstance(value, dict) and key != "knobs":
            value = {**default, **value}
        if default is not None and not _same_kind(default, value):
            raise ConfigError(f"{where}: {prefix}{key} must be {type(default).__name__}, got {value!r}")
        setattr(obj, key, value)
    return obj


def _same_kind(default, value) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) == isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def _known(where: str, prefix: str, table: dict, allowed: set) -> None:
    import difflib
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean {prefix}{close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {prefix}{key}{hint} (allowed: {', '.join(sorted(allowed))})")
