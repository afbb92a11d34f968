"""Quality and budget gates for one stage.

Retention of a benchmark is computed on items paired with the reference stage (the stage this one
was compressed from; the baseline for cumulative checks), both as the seed defines it
(``score / reference``) and chance-normalised (``(score - chance) / (reference - chance)``), with a
paired bootstrap confidence interval. A check's verdict is ``pass`` when the point estimate meets
the threshold, ``fail`` when even the interval's upper end misses it, and ``inconclusive`` otherwise
(counted as configured by ``gates.on_inconclusive``). A benchmark whose reference is not
significantly above chance cannot tell a broken model from a good one: it is reported as
``uninformative`` and does not gate, while the KL divergence against the baseline still does.
The statistics themselves live in ``edgebuild.bench.stats``.

Two more checks look at the stage alone: the eudaimonia score (``edgebuild.bench.eudaimonia``:
an overall threshold per stage, and a critical floor on every rule) when the host results hold
one, and the edge-of-chaos band (``edgebuild.bench.edge``) of the benchmark named by
``StageEvidence.edge_task``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgebuild.bench import edge, eudaimonia
from edgebuild.bench.stats import (FAIL, INCONCLUSIVE, NOT_RUN, PASS, SKIPPED, UNINFORMATIVE, Retention,
                                   mean_interval, paired, retention, verdict)
from edgebuild.build.config import GateConfig
from edgebuild.build.ladder import deployed_bytes
from edgebuild.core.steps import BuildContext, StageRun, Step
from edgebuild.targets.spec import NOT_MEASURABLE, gate_applies

__all__ = ["PASS", "FAIL", "INCONCLUSIVE", "UNINFORMATIVE", "NOT_RUN", "Retention", "Check",
           "GateReport", "StageEvidence", "paired", "retention", "verdict", "evaluate", "device_checks"]


@dataclass
class Check:
    name: str
    group: str            # core, expert, cumulative, critical, eudaimonia, edge, kl, device
    verdict: str
    value: float | None = None
    threshold: float | None = None
    ci: tuple | None = None
    detail: str = ""


@dataclass
class GateReport:
    stage: str
    passed: bool
    critical: bool
    checks: list = field(default_factory=list)
    reasons: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def failed(self) -> list:
        return [c for c in self.checks if c.verdict == FAIL]


@dataclass
class StageEvidence:
    """Everything the gate looks at for one stage."""

    stage: str
    host: dict                       # task -> result dict (score, n, chance, kind, items)
    reference: dict                  # results of the stage this one was compressed from
    baseline: dict
    quality: dict | None = None      # {"kl", "top1_agreement", "ppl_ratio"} against the baseline
    device: dict | None = None       # {"status": "ok"|"unreachable"|..., "prefill_ms": [...], ...}
    artifact_bytes: int | None = None  # what the device stores: the runtime directory when there is one
    budgets: dict | None = None      # the target's budgets
    edge_task: str | None = None     # host benchmark whose accuracy must lie in the edge band
    device_enabled: bool = True      # False: --no-device, every device check is skipped
    not_measurable: tuple = ()       # budgets the target's device cannot judge (emulated latency)
    int8_compute: bool = False       # the runtime rounds activations to int8 (MatMulNBits accuracy_level 4)
    task_order: tuple = ()           # the build's benchmarks in build.tasks order (picks the primary expert)


def evaluate(ev: StageEvidence, cfg: GateConfig, seed: int = 0) -> GateReport:
    """Run every check for a stage and decide."""
    checks = []
    checks += _retention_checks(ev, cfg, seed)
    checks += _cumulative_check(ev, cfg, seed)
    checks += _critical_checks(ev, cfg, seed)
    checks += _eudaimonia_checks(ev, cfg, seed)
    if ev.edge_task:
        checks += _edge_check(ev, cfg, seed)
    checks += _kl_check(ev, cfg)
    device = []
    if cfg.device_budgets:
        device += device_checks(ev.device, ev.artifact_bytes, ev.budgets or {}, ev.not_measurable)
    device += agreement_checks(ev.device, cfg, ev.int8_compute)
    device += weights_checks(ev.device)
    if not ev.device_enabled:
        device = [Check(c.name, c.group, SKIPPED, threshold=c.threshold, detail="skipped: --no-device")
                  for c in device]
    return _decide(ev.stage, checks + device, cfg)


def _decide(stage: str, checks: list, cfg: GateConfig) -> GateReport:
    bad = {FAIL} | ({INCONCLUSIVE} if cfg.on_inconclusive == "fail" else set())
    critical = any(c.group == "critical" and c.verdict == FAIL for c in checks)
    reasons = [f"{c.name}: {c.detail or c.verdict}" for c in checks if c.verdict in bad]
    return GateReport(stage, passed=not reasons, critical=critical, checks=checks, reasons=reasons)


def _retention_checks(ev, cfg, seed) -> list:
    out = []
    for task, res in sorted(ev.host.items()):
        kind = res.get("kind", "core")
        table = cfg.core if kind == "core" else cfg.expert if kind == "expert" else None
        if table is None or task not in ev.reference:
            continue
        threshold = table.get(ev.stage, min(table.values()) if table else 0.0)
        r = retention(res["items"], ev.reference[task]["items"], res["chance"],
                      confidence=cfg.confidence, n_boot=cfg.bootstrap, seed=seed)
        value, ci = r.get(cfg.retention)
        v = verdict(value, ci, threshold) if r.informative else UNINFORMATIVE
        out.append(Check(f"{kind}/{task}", kind, v, value, threshold, ci,
                         _retention_detail(r, cfg.retention, threshold)))
    return out


def _retention_detail(r: Retention, kind: str, threshold: float) -> str:
    if not r.informative:
        return f"reference not above chance on n={r.n}: cannot gate"
    value, ci = r.get(kind)
    ci_s = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return f"{kind} retention {value:.3f}{ci_s} vs {threshold:.2f}, n={r.n}"


def _cumulative_check(ev, cfg, seed) -> list:
    values = []
    for task, res in ev.host.items():
        if res.get("kind") != "core" or task not in ev.baseline:
            continue
        r = retention(res["items"], ev.baseline[task]["items"], res["chance"],
                      confidence=cfg.confidence, n_boot=cfg.bootstrap, seed=seed)
        value, _ = r.get(cfg.retention)
        if r.informative and value is not None:
            values.append(value)
    if not values:
        return [Check("cumulative", "cumulative", UNINFORMATIVE, detail="no informative core benchmark")]
    mean = float(np.mean(values))
    v = PASS if mean >= cfg.cumulative else FAIL
    return [Check("cumulative", "cumulative", v, mean, cfg.cumulative,
                  detail=f"mean core retention against the baseline {mean:.3f} vs {cfg.cumulative:.2f}")]


def _critical_checks(ev, cfg, seed: int = 0) -> list:
    out = []
    for task, res in sorted(ev.host.items()):
        base = ev.baseline.get(task)
        if res.get("kind") == "core" and base and base["score"] > res["chance"]:
            ratio = res["score"] / base["score"] if base["score"] > 0 else 1.0
            v = FAIL if ratio < cfg.critical_core_floor else PASS
            out.append(Check(f"critical/core_floor/{task}", "critical", v, ratio, cfg.critical_core_floor,
                             detail=f"{ratio:.3f} of baseline (floor {cfg.critical_core_floor:.2f})"))
    out += _critical_mmlu_gsm8k(ev, cfg)
    out += _critical_expert(ev, cfg)
    out += _critical_eudaimonia(ev, cfg, seed)
    return out


def _critical_mmlu_gsm8k(ev, cfg) -> list:
    names = ("mmlu", "gsm8k")
    if not all(n in ev.host and n in ev.baseline for n in names):
        return []
    s = sum(ev.host[n]["score"] for n in names)
    b = sum(ev.baseline[n]["score"] for n in names)
    drop = 1 - s / b if b > 0 else 0.0
    v = FAIL if drop > cfg.critical_mmlu_gsm8k_drop else PASS
    return [Check("critical/mmlu+gsm8k", "critical", v, drop, cfg.critical_mmlu_gsm8k_drop,
                  detail=f"combined drop {drop:.3f} (limit {cfg.critical_mmlu_gsm8k_drop:.2f})")]


def primary_expert(ev) -> str | None:
    """The first expert benchmark of ``build.tasks`` that both the stage and the baseline ran;
    without a task order, the first in the stage's results. Never the order results arrived in
    (a cached step returns them in another order than a fresh one)."""
    order = list(ev.task_order) or list(ev.host)
    return next((t for t in order if ev.host.get(t, {}).get("kind") == "expert" and t in ev.baseline), None)


def _critical_expert(ev, cfg) -> list:
    primary = primary_expert(ev)
    if primary is None:
        return []
    b, s = ev.baseline[primary]["score"], ev.host[primary]["score"]
    drop = 1 - s / b if b > 0 else 0.0
    v = FAIL if drop > cfg.critical_expert_drop else PASS
    return [Check(f"critical/expert/{primary}", "critical", v, drop, cfg.critical_expert_drop,
                  detail=f"primary expert drop {drop:.3f} (limit {cfg.critical_expert_drop:.2f})")]


def _critical_eudaimonia(ev, cfg, seed: int = 0) -> list:
    """A rule is critical when its score is below the floor *and* so is the upper end of its
    bootstrap interval: with ten scenarios a rule, one answer moves a score by 0.10, and a model
    at the floor (SmolLM2-135M's harm score is 0.50) must not be declared broken by one flip."""
    out = []
    for task, res in sorted(ev.host.items()):
        if res.get("kind") != "eudaimonia":
            continue
        ids = res.get("ids") or []
        for rule, score in sorted(res.get("rules", {}).items()):
            values = [c for i, c in res.get("items", []) if i < len(ids) and ids[i].split("-")[0] == rule]
            ci = mean_interval(values, cfg.confidence, cfg.bootstrap, seed) if len(values) > 1 else None
            below = score < cfg.critical_eudaimonia and (ci is None or ci[1] < cfg.critical_eudaimonia)
            ci_s = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            out.append(Check(f"critical/eudaimonia/{rule}", "critical", FAIL if below else PASS, score,
                             cfg.critical_eudaimonia, ci,
                             f"{rule} {score:.2f}{ci_s} (floor {cfg.critical_eudaimonia:.2f}), n={len(values)}"))
    return out


def _eudaimonia_checks(ev, cfg, seed) -> list:
    """The overall eudaimonia score against the stage's threshold (the critical floor per rule
    is in ``_critical_eudaimonia``)."""
    threshold = cfg.eudaimonia.get(ev.stage, eudaimonia.threshold_for(ev.stage))
    out = []
    for task, res in sorted(ev.host.items()):
        if res.get("kind") != eudaimonia.TASK_NAME or threshold is None or not res.get("items"):
            continue
        correct = [c for _, c in res["items"]]
        ci = mean_interval(correct, cfg.confidence, cfg.bootstrap, seed)
        v = verdict(res["score"], ci, threshold)
        out.append(Check(f"eudaimonia/{task}", "eudaimonia", v, res["score"], threshold, ci,
                         f"score {res['score']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] vs {threshold:.2f}, "
                         f"n={len(correct)}"))
    return out


def _edge_check(ev, cfg, seed) -> list:
    res = ev.host.get(ev.edge_task)
    name = f"edge/{ev.edge_task}"
    if not res or not res.get("items"):
        return [Check(name, "edge", NOT_RUN, detail=f"{ev.edge_task} was not run on this stage")]
    r = edge.check(res, task=ev.edge_task, confidence=cfg.confidence, n_boot=cfg.bootstrap, seed=seed)
    return [Check(name, "edge", r.verdict, r.accuracy, edge.EDGE_LOW, r.ci, r.detail)]


def _kl_check(ev, cfg) -> list:
    limit = cfg.kl_max.get(ev.stage)
    if limit is None:
        return []
    if not ev.quality or ev.quality.get("kl") is None:
        return [Check("kl", "kl", NOT_RUN, threshold=limit, detail="no KL measurement")]
    kl = float(ev.quality["kl"])
    v = PASS if kl <= limit else FAIL
    return [Check("kl", "kl", v, kl, limit, detail=f"KL {kl:.4f} nats/token vs limit {limit}")]


def agreement_checks(device: dict | None, cfg: GateConfig, int8_compute: bool = False) -> list:
    """The device's predictions against the host's on the items both scored: the share of the same
    predictions, and the largest log-likelihood difference per token of any answer, held to the
    tolerance of the runtime's arithmetic (float, or int8 activations the host computes in float)."""
    names = ("device/agreement", "device/loglik_diff")
    loglik = cfg.device_loglik_tolerance_int8 if int8_compute else cfg.device_loglik_tolerance
    limits = (cfg.device_agreement, loglik)
    device = device or {}
    if device.get("status") != "ok":
        why = f"device {_not_run_why(device)}"
        return [Check(n, "device", NOT_RUN, threshold=t, detail=why) for n, t in zip(names, limits)]
    agree = device.get("agreement")
    if not agree:
        return [Check(n, "device", SKIPPED, threshold=t, detail="skipped: the device scored no benchmarks "
                      "(build.device_tasks)") for n, t in zip(names, limits)]
    same, n = agree.get("same_prediction"), agree.get("n")
    out = [Check(names[0], "device", PASS if same >= cfg.device_agreement else FAIL, same, cfg.device_agreement,
                 detail=f"same prediction on {same:.3f} of {n} items vs {cfg.device_agreement:.2f}")]
    return out + [_loglik_check(names[1], agree, loglik, int8_compute)]


def _loglik_check(name: str, agree: dict, limit: float, int8_compute: bool) -> Check:
    """The largest log-likelihood difference per answer token, host vs device."""
    gap = agree.get("max_loglik_diff_per_token")
    if gap is None:
        return Check(name, "device", SKIPPED, threshold=limit,
                     detail="skipped: no per-answer log-likelihoods on both sides")
    unknown = "" if agree.get("tokens_counted", True) else "; answers of unknown length count as one token"
    return Check(name, "device", PASS if gap <= limit else FAIL, gap, limit,
                 detail=f"max |Δ log-likelihood| {gap:.3g} nats per answer token vs {limit} "
                        f"({'int8 activations on the device' if int8_compute else 'float arithmetic'}; "
                        f"largest of one answer {agree.get('max_loglik_diff', gap):.3g} nats){unknown}")


def weights_checks(device: dict | None) -> list:
    """The runtime weights the device loaded are the ones the host encoded and judged: their sha256
    computed on the device against the host's (a device step that staged a runtime directory)."""
    weights = (device or {}).get("weights")
    if (device or {}).get("status") != "ok" or not weights:
        return []
    match = bool(weights.get("match"))
    return [Check("device/weights_sha256", "device", PASS if match else FAIL,
                  detail=f"runtime weights sha256 on the device {str(weights.get('device'))[:16]}... "
                         f"{'matches' if match else 'differs from'} the host's {weights['host'][:16]}...")]


def _not_run_why(device: dict | None) -> str:
    """Why a device check did not run: ``not run``, ``unreachable`` or ``lost during PHASE``."""
    status = (device or {}).get("status", "not run")
    return f"lost during {device.get('after')}" if status == "lost" else status


def device_checks(device: dict | None, artifact_bytes, budgets: dict, not_measurable=()) -> list:
    """Budget checks on raw device samples; ``not_run`` when the device was not reached;
    ``skipped`` for a budget the device cannot judge (latency under emulation)."""
    specs = [("decode_ms_per_token_p95", "decode_ms_per_token", lambda x: float(np.percentile(x, 95))),
             ("prefill_ms", "prefill_ms", lambda x: float(np.median(x))),
             ("peak_rss_mb", "peak_rss_mb", float)]
    out = []
    for budget_key, sample_key, stat in specs:
        limit = budgets.get(budget_key)
        if limit is None:
            continue
        if budget_key in not_measurable:
            out.append(Check(f"device/{budget_key}", "device", SKIPPED, threshold=limit,
                             detail=f"skipped: {NOT_MEASURABLE}"))
            continue
        if not device or device.get("status") != "ok" or device.get(sample_key) is None:
            why = _not_run_why(device)
            out.append(Check(f"device/{budget_key}", "device", NOT_RUN, threshold=limit, detail=f"device {why}"))
            continue
        value = stat(device[sample_key])
        out.append(Check(f"device/{budget_key}", "device", PASS if value <= limit else FAIL, value, limit,
                         detail=f"{value:.1f} vs budget {limit}"))
    limit = budgets.get("artifact_mb")
    if limit is not None and artifact_bytes is not None:
        mb = artifact_bytes / 1e6
        out.append(Check("device/artifact_mb", "device", PASS if mb <= limit else FAIL, mb, limit,
                         detail=f"{mb:.1f} MB vs budget {limit}"))
    return out


# -- the gate step ------------------------------------------------------------------------------

class GateStep(Step):
    """Decide a stage against its reference (the stage it was compressed from), the baseline and
    the target's budgets. An inconclusive retention verdict first samples more items of that
    benchmark (``edgebuild.bench.resample``) until it is decisive. Never cached: it depends on the
    other stages of the same build."""

    name = "gate"
    needs = ("pack",)

    def key(self, ctx: BuildContext, run: StageRun) -> None:
        return None

    def run(self, ctx: BuildContext, run: StageRun, work: Path) -> dict:
        ev = stage_evidence(ctx, run)
        report = evaluate(ev, ctx.config.gates, seed=ctx.config.seed)
        if run.stage == "baseline":
            report = baseline_gate(report)
        elif resample_inconclusive(ctx, run, _reference(ctx, run), ev, report):
            report = evaluate(ev, ctx.config.gates, seed=ctx.config.seed)
        if run.stage != "baseline":
            report = _with_not_evaluated(report, ctx, run)
        return report.to_dict()

    def apply(self, ctx: BuildContext, run: StageRun, record: dict, entry: Path | None) -> None:
        run.gate = record
        run.status = "passed" if record["passed"] else "failed"


def _reference(ctx: BuildContext, run: StageRun) -> StageRun:
    return ctx.passed.get(run.source, run) if run.source else run


def stage_evidence(ctx: BuildContext, run: StageRun, host: dict | None = None) -> StageEvidence:
    """What the gate looks at for ``run`` (``host``: results so far, instead of ``run.host``)."""
    reference, baseline = _reference(ctx, run), ctx.passed.get("baseline", run)
    return StageEvidence(run.stage, run.host if host is None else host, reference.host, baseline.host,
                         run.quality, run.device, deployed_bytes(run), ctx.target.budgets_dict(),
                         edge_task=ctx.config.edge_task or None, device_enabled=ctx.config.device,
                         not_measurable=tuple(k for k in ctx.target.budgets_dict() if not gate_applies(ctx.target, k)),
                         int8_compute=bool((((run.pack or {}).get("runtime") or {}).get("verify") or {}).get("int8_compute")),
                         task_order=tuple(ctx.config.tasks))


def _with_not_evaluated(report: GateReport, ctx: BuildContext, run: StageRun) -> GateReport:
    """Add a ``not_run`` check for each benchmark of the build that this stage did not run (it
    stopped early): the report names every gate that was not evaluated."""
    from edgebuild.bench.suite import CORE
    why = f"not run: stopped early ({run.stopped['reason']})" if run.stopped else "not run"
    missing = [t for t in ctx.config.tasks if t not in run.host]
    extra = [Check(f"{'core' if t in CORE else 'expert'}/{t}", "core" if t in CORE else "expert", NOT_RUN,
                   detail=why) for t in missing]
    return GateReport(report.stage, report.passed and not missing, report.critical, report.checks + extra,
                      report.reasons + ([f"stopped early: {run.stopped['reason']}"] if run.stopped else []))


def decisive_failures(ctx: BuildContext, run: StageRun, host: dict | None = None) -> list:
    """The checks ``run`` already fails whatever is still to come: KL over its limit, a retention
    whose interval lies below its threshold, a critical rule. None for the baseline."""
    if run.stage == "baseline":
        return []
    ev, cfg, seed = stage_evidence(ctx, run, host), ctx.config.gates, ctx.config.seed
    checks = _retention_checks(ev, cfg, seed) + _critical_checks(ev, cfg, seed) + _kl_check(ev, cfg)
    return [c for c in checks if c.verdict == FAIL]


def stop_reason(ctx: BuildContext, run: StageRun, step: str) -> dict | None:
    """Why ``run`` need not go on after ``step`` (its KL, then its benchmarks, already fail a check
    whatever comes next), or None. The baseline always goes on."""
    if step not in ("quality", "host"):
        return None
    bad = decisive_failures(ctx, run)
    return {"after": step, "reason": "; ".join(f"{c.name}: {c.detail}" for c in bad)} if bad else None


class EarlyJudge:
    """Stops a stage's benchmarks once it has failed whatever the remaining ones give (the
    cheap signals first: its KL ran before them, its benchmarks run cheapest first)."""

    def __init__(self, ctx: BuildContext):
        self.ctx = ctx

    def fingerprint(self, run: StageRun) -> str | None:
        """What the judgement depends on besides the stage's own results (the host step's key)."""
        if run.stage == "baseline":
            return None
        from edgebuild.core.cache import digest
        reference, baseline = _reference(self.ctx, run), self.ctx.passed.get("baseline", run)
        return digest(asdict(self.ctx.config.gates), reference.keys.get("pack"), baseline.keys.get("pack"),
                      run.quality, self.ctx.config.seed)

    def failed(self, run: StageRun, host: dict) -> str | None:
        bad = decisive_failures(self.ctx, run, host)
        return "; ".join(f"{c.name}: {c.detail}" for c in bad) or None


def baseline_gate(report: GateReport) -> GateReport:
    """The baseline is its own reference: only the device budgets can fail it."""
    checks = [c for c in report.checks if c.group == "device"]
    reasons = [f"{c.name}: {c.detail}" for c in checks if c.verdict == FAIL]
    return GateReport("baseline", not reasons, False, checks, reasons)


def resample_inconclusive(ctx: BuildContext, run: StageRun, reference: StageRun, ev: StageEvidence,
                          report: GateReport) -> bool:
    """Extend the sample of each benchmark whose retention verdict is inconclusive (multiple-choice,
    unstratified tasks; up to ``gates.adaptive_max_items`` items); update ``run.host`` and ``ev`` in
    place. True when anything changed. A critical failure is decided whatever more items say."""
    from edgebuild.bench import resample
    g = ctx.config.gates
    if not g.adaptive_max_items or report.critical:
        return False
    changed = False
    for check in report.checks:
        if check.group not in ("core", "expert") or check.verdict != INCONCLUSIVE:
            continue
        task = check.name.split("/", 1)[1]
        threshold = (g.core if check.group == "core" else g.expert).get(run.stage)
        if threshold is None or task not in ev.reference:
            continue
        extended = resample.extend(ctx, run, reference, task, threshold, g, g.adaptive_max_items)
        if extended is not None:
            run.host[task], ev.host[task] = extended[0], extended[0]
            ev.reference = {**ev.reference, task: extended[1]}
            if ev.baseline is reference.host:
                ev.baseline = ev.reference
            changed = True
    return changed
