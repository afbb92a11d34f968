"""The stage graph: baseline → compressed stages, each compress → export → bench → gate.

Every step's output is cached by content (``edgebuild.core.cache``): keys are computed without
loading the model, so a finished build reruns without importing torch and says it did no work.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgebuild.build import gates
from edgebuild.core import models
from edgebuild.core.cache import StepCache, code_version, digest
from edgebuild.core.data import check_data_dir, data_fingerprint
from edgebuild.core.files import sha256_file, write_json_atomic
from edgebuild.build.config import BuildConfig, StageConfig
from edgebuild.core.errors import ConfigError, DataError, DeviceError, EdgebuildError, ExitCode
from edgebuild.core.progress import Progress

log = logging.getLogger(__name__)

PACKED = "weights.ebpk"
STEPS = ("pack", "export", "host", "device", "gate")


@dataclass
class BuildRequest:
    model: str
    target: str
    config: BuildConfig
    out: Path
    data_dir: Path | None = None
    force: bool = False
    from_stage: str | None = None
    steps: tuple = STEPS             # which steps to run (partial commands run fewer)
    progress: Progress = field(default_factory=lambda: Progress(False))


@dataclass
class StageRun:
    """One attempt at one stage, with everything measured."""

    stage: str
    method: str
    knobs: dict
    attempt: int
    source: str | None
    keys: dict = field(default_factory=dict)
    pack: dict = field(default_factory=dict)
    verify: dict = field(default_factory=dict)
    host: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    device: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)
    status: str = "pending"   # passed, failed, skipped
    note: str = ""


@dataclass
class BuildResult:
    runs: list
    shipped: str
    exit_code: ExitCode
    cache_hits: int
    cache_misses: int
    target: object
    model_ref: object
    config: BuildConfig
    out_dir: Path
    partial: bool = False          # not every step ran (compress, export, deploy, bench)


class Pipeline:
    def __init__(self, req: BuildRequest):
        from edgebuild.targets import load_target
        self.req, self.cfg = req, req.config
        self.ref = models.resolve(req.model)
        self.target = load_target(req.target)
        self.cache = StepCache(req.out / "cache", force=req.force)
        self.out_dir = req.out / self.target.name
        self._base = None          # (model, tokenizer), loaded on first need
        self._client = None
        self._device_state = None  # None until first contact; then "ok" or the failure text
        self.progress = req.progress
        if req.from_stage and req.from_stage not in self.cfg.stages:
            raise ConfigError(f"--from {req.from_stage!r} is not a stage of this build ({', '.join(self.cfg.stages)})")

    # -- orchestration -------------------------------------------------------------------------
    def run(self) -> BuildResult:
        check_data_dir(self.req.data_dir)
        runs, passed = [], {}
        try:
            for name in self.cfg.stages:
                self._forced = self.req.force or self._redo(name)
                for run in self._stage_attempts(name, passed):
                    runs.append(run)
                    if run.status == "passed":
                        passed[name] = run
        finally:
            self._close_device()
        shipped = self._choose(passed)
        return BuildResult(runs, shipped, self._exit_code(shipped), len(self.cache.hits),
                           len(self.cache.misses), self.target, self.ref, self.cfg, self.out_dir,
                           partial="gate" not in self.req.steps)

    def _redo(self, name: str) -> bool:
        stages = self.cfg.stages
        return bool(self.req.from_stage) and stages.index(name) >= stages.index(self.req.from_stage)

    def _choose(self, passed: dict) -> str:
        for name in reversed(self.cfg.stages):
            if name in passed:
                return name
        return "baseline"

    def _exit_code(self, shipped: str) -> ExitCode:
        if shipped == self.cfg.stages[-1] and len(self.cfg.stages) > 1:
            return ExitCode.OK
        if shipped == "baseline":
            return ExitCode.BASELINE_ONLY if len(self.cfg.stages) > 1 else ExitCode.OK
        return ExitCode.FALLBACK

    def _stage_attempts(self, name: str, passed: dict):
        if name == "baseline":
            yield self._run_stage(name, StageConfig(method="raw"), 0, None, passed)
            return
        sc = self.cfg.stage_config(name)
        source = self._source(name, sc, passed)
        if source is None:
            yield StageRun(name, sc.method, dict(sc.knobs), 0, None, status="skipped",
                           note="its source stage did not pass")
            return
        knobs = dict(sc.knobs)
        for attempt in range(self.cfg.gates.max_retries + 1):
            run = self._run_stage(name, StageConfig(sc.method, knobs, sc.source, sc.include_embeddings,
                                                    sc.scope), attempt, source, passed)
            yield run
            if run.status == "passed" or run.gate.get("critical"):
                return
            knobs = self._recommend(sc.method, knobs, run)
            if knobs is None:
                return

    def _source(self, name: str, sc: StageConfig, passed: dict):
        if sc.source == "baseline":
            return passed.get("baseline")
        idx = self.cfg.stages.index(name)
        prev = self.cfg.stages[idx - 1]
        return passed.get(prev)

    def _recommend(self, method: str, knobs: dict, run: StageRun):
        from edgebuild.compress import methods
        m = methods.get(method).from_knobs(knobs)
        new = m.recommend(run.gate)
        if new is None:
            return None
        import dataclasses
        return dataclasses.asdict(new)

    # -- one stage -----------------------------------------------------------------------------
    def _run_stage(self, name, sc: StageConfig, attempt, source: StageRun | None, passed) -> StageRun:
        run = StageRun(name, sc.method, dict(sc.knobs), attempt, source.stage if source else None)
        self.progress.note(f"[{name}] {sc.method} {sc.knobs or ''} attempt {attempt + 1}")
        steps = self.req.steps
        run.keys["pack"] = self._pack(run, sc, source)
        if "export" in steps or "device" in steps:
            run.keys["graph"] = self._graph()
            self._verify(run)
        if "host" in steps:
            self._host(run)
        if "device" in steps:
            self._device(run)
        if "gate" not in steps:
            run.status, run.note = "passed", "partial build: not gated"
            return run
        baseline = passed.get("baseline", run)
        reference = source or run
        ev = gates.StageEvidence(name, run.host, reference.host, baseline.host, run.quality, run.device,
                                 run.pack.get("bytes"), self.target.budgets_dict(),
                                 edge_task=self.cfg.edge_task or None)
        report = gates.evaluate(ev, self.cfg.gates, seed=self.cfg.seed)
        if name == "baseline":
            report = self._baseline_gate(report)
        elif self._adaptive(run, reference, ev, report):
            report = gates.evaluate(ev, self.cfg.gates, seed=self.cfg.seed)
        run.gate = report.to_dict()
        run.status = "passed" if report.passed else "failed"
        return run

    # -- adaptive sampling ------------------------------------------------------------------------
    def _adaptive(self, run: StageRun, reference: StageRun, ev, report) -> bool:
        """Extend the sample of each task whose retention verdict is inconclusive, round by round
        (doubling, up to ``gates.adaptive_max_items`` and 4x the profile's sample) until decisive;
        update ``run.host`` and the
        evidence in place. Multiple-choice, unstratified tasks only. True when anything changed."""
        limit = self.cfg.gates.adaptive_max_items
        if not limit or "host" not in self.req.steps or report.critical:
            return False                     # a critical failure is decided whatever more items say
        from edgebuild.bench import benchmarks
        undecided = [c.name.split("/", 1)[1] for c in report.checks
                     if c.group in ("core", "expert") and c.verdict == gates.INCONCLUSIVE]
        changed = False
        for task in undecided:
            bench = benchmarks.get(task)
            if bench.strata_key is not None or bench.generation is not None or task not in ev.reference:
                continue
            changed |= self._extend(run, reference, ev, task, bench, limit)
        return changed

    def _extend(self, run, reference, ev, task, bench, limit) -> bool:
        from edgebuild.bench import adaptive
        g, res = self.cfg.gates, run.host[task]
        threshold = (g.core if res.get("kind", "core") == "core" else g.expert).get(run.stage)
        docs = bench.convert(Path(self.req.data_dir)).eval_docs
        order = adaptive.extension_order(task, len(docs), [d for d, _ in res["items"]], self.cfg.seed)
        limit = min(limit, 4 * len(res["items"]))     # at most two doublings past the profile's sample
        if threshold is None or not order or len(res["items"]) >= limit:
            return False
        self.progress.note(f"[{run.stage}] {task}: retention inconclusive, sampling more items")
        out = adaptive.sample_until_decisive(
            lambda ids: self._extra_items(run, task, ids), self._reference_items(reference, task),
            order, threshold=threshold, chance=res["chance"], initial=res["items"],
            kind=g.retention, confidence=g.confidence, n_boot=g.bootstrap, seed=self.cfg.seed,
            max_items=limit)
        run.host[task] = _with_items(res, out.items, bench, docs)
        ev.host[task] = run.host[task]
        ev.reference = {**ev.reference, task: _with_items(ev.reference[task], out.baseline_items, bench, docs)}
        if ev.baseline is reference.host:
            ev.baseline = ev.reference
        run.host[task]["adaptive"] = [dataclasses.asdict(r) for r in out.history]
        return True

    def _reference_items(self, reference: StageRun, task: str):
        """Reference items by doc id: those it already has, the rest evaluated (and cached)."""
        known = {int(d): [int(d), c] for d, c in reference.host[task]["items"]}

        def items(ids):
            missing = [int(i) for i in ids if int(i) not in known]
            for d, c in self._extra_items(reference, task, missing) if missing else []:
                known[int(d)] = [int(d), c]
            return [known[int(i)] for i in ids]
        return items

    def _extra_items(self, run: StageRun, task: str, ids: list) -> list:
        """``[[doc_id, correct]]`` of ``run``'s model on the items ``ids`` of ``task`` (cached)."""
        ids = sorted(int(i) for i in ids)
        key = digest("host-items", run.keys["pack"], task, ids, data_fingerprint(self.req.data_dir), self.cfg.seed,
                     code_version("bench"))
        entry = self.cache.get("hostitems", key)
        if entry is None:
            from edgebuild.bench.runner import run_host
            model, tok = self._model_for(run)
            with self.cache.build("hostitems", key) as work, \
                    self.progress.step(f"{len(ids)} more items of {task} ({run.stage})") as update:
                res = run_host(model, tok, [task], self.cfg.profile, self.req.data_dir,
                               self.req.out / "cache" / "data", seed=self.cfg.seed, doc_ids={task: ids},
                               progress=update)
                write_json_atomic(work / "items.json", res[task].items)
            entry = self.cache.path("hostitems", key)
        return json.loads((entry / "items.json").read_text())

    def _baseline_gate(self, report):
        """The baseline is its own reference: only the device budgets can fail it."""
        checks = [c for c in report.checks if c.group == "device"]
        reasons = [f"{c.name}: {c.detail}" for c in checks if c.verdict == gates.FAIL]
        return gates.GateReport("baseline", not reasons, False, checks, reasons)

    # -- steps ---------------------------------------------------------------------------------
    def _get(self, step: str, key: str):
        if self._forced:
            return None
        return self.cache.get(step, key)

    def _pack(self, run: StageRun, sc: StageConfig, source: StageRun | None) -> str:
        key = digest("pack", self.ref.fingerprint, source.keys["pack"] if source else None, sc.method,
                     sc.knobs, sc.include_embeddings, sc.scope, self.cfg.seed, self.cfg.calibration_texts,
                     code_version("compress", "device_agent"))
        entry = self._get("pack", key)
        if entry is None:
            with self.cache.build("pack", key) as work:
                self._do_pack(work, run, sc, source)
            entry = self.cache.path("pack", key)
        run.pack = json.loads((entry / "pack.json").read_text())
        run.pack["path"] = str(entry / PACKED)
        return key

    def _do_pack(self, work: Path, run: StageRun, sc: StageConfig, source: StageRun | None) -> None:
        from edgebuild.compress import packed_stats
        from edgebuild.device_agent import packed
        t0 = time.time()
        records, facts = self._compress(run.stage, sc, source)
        sha = packed.write(work / PACKED, records, meta={"stage": run.stage, "method": sc.method,
                                                         "knobs": sc.knobs, "model": self.ref.spec})
        stats = packed_stats(records)
        info = {"method": sc.method, "knobs": sc.knobs, "sha256": sha, "bytes": (work / PACKED).stat().st_size,
                "stats": stats, "facts": facts, "seconds": time.time() - t0,
                "reference_method": self._is_reference(sc.method)}
        write_json_atomic(work / "pack.json", info)

    def _is_reference(self, method: str) -> bool:
        if method == "raw":
            return False
        from edgebuild.compress import methods
        return bool(getattr(methods.get(method), "reference", False))

    def _compress(self, stage: str, sc: StageConfig, source: StageRun | None):
        from edgebuild.compress import pack_model
        from edgebuild.compress.base import CompressContext
        model, tok = self._stage_model(source)
        if sc.method == "raw":
            return _raw_records(model), {}
        ctx = CompressContext(model=model, tokenizer=tok, calibration_texts=self._calibration_texts(),
                              device=_device(), seed=self.cfg.seed)
        with self.progress.step(f"compress {stage} ({sc.method})") as update:
            ctx.progress = update
            if sc.scope == "leftovers":
                from edgebuild.compress import pack_leftovers
                from edgebuild.device_agent import packed
                _, source_records = packed.read(source.pack["path"])
                records = pack_leftovers(source_records, sc.method, sc.knobs, ctx)
            else:
                records = pack_model(model, sc.method, sc.knobs, ctx, include_embeddings=sc.include_embeddings)
        return records, ctx.log

    def _calibration_texts(self) -> list:
        if not self.cfg.calibration_texts:
            return []
        from edgebuild.bench.quality import quality_texts
        held_out = set(self._fixed_texts())
        pool = quality_texts(self.req.data_dir, self.cfg.calibration_texts + len(held_out), seed=self.cfg.seed + 1)
        return [t for t in pool if t not in held_out][: self.cfg.calibration_texts]

    def _fixed_texts(self) -> list:
        from edgebuild.bench.quality import quality_texts
        return quality_texts(self.req.data_dir, seed=self.cfg.seed)

    def _graph(self) -> str:
        from edgebuild.export import exporters
        key = digest("graph", self._arch_fingerprint(), self.cfg.exporter, code_version("export"))
        if self._get("graph", key) is None:
            model, tok = self._base_model()
            with self.cache.build("graph", key) as work, self.progress.step("export graph"):
                exporters.get(self.cfg.exporter)().export(model, tok, work)
        return key

    def _arch_fingerprint(self) -> str:
        if self.ref.kind == "tiny-random":
            return self.ref.fingerprint
        cfg_file = Path(self.ref.path) / "config.json" if Path(self.ref.path).is_dir() else None
        if cfg_file and cfg_file.exists():
            return digest(json.loads(cfg_file.read_text()))
        return self.ref.fingerprint

    def _verify(self, run: StageRun) -> None:
        key = digest("verify", run.keys["pack"], run.keys["graph"], code_version("export", "device_agent"))
        entry = self._get("verify", key)
        if entry is None:
            from edgebuild.export import exporters
            state = self._decoded(run)
            model, tok = self._model_for(run)
            with self.cache.build("verify", key) as work, self.progress.step(f"verify export {run.stage}"):
                res = exporters.get(self.cfg.exporter)().verify(self.cache.path("graph", run.keys["graph"]),
                                                                state, model, tok)
                write_json_atomic(work / "verify.json", res)
            entry = self.cache.path("verify", key)
        run.verify = json.loads((entry / "verify.json").read_text())

    def _host(self, run: StageRun) -> None:
        key = digest("host", run.keys["pack"], self.cfg.tasks, self.cfg.profile, data_fingerprint(self.req.data_dir),
                     self.cfg.seed, self._scenarios_fingerprint(), code_version("bench"))
        entry = self._get("host", key)
        if entry is None:
            from edgebuild.bench.runner import run_host
            model, tok = self._model_for(run)
            with self.cache.build("host", key) as work, \
                    self.progress.step(f"benchmarks {run.stage}") as update:
                results = run_host(model, tok, self.cfg.tasks, self.cfg.profile, self.req.data_dir,
                                   self.req.out / "cache" / "data", seed=self.cfg.seed, progress=update)
                results = {k: v.to_dict() for k, v in results.items()}
                if self.cfg.eudaimonia:
                    results.update(self._eudaimonia(run, model, tok))
                write_json_atomic(work / "results.json", results)
                write_json_atomic(work / "quality.json", self._quality(run, model, tok))
            entry = self.cache.path("host", key)
        run.host = json.loads((entry / "results.json").read_text())
        run.quality = json.loads((entry / "quality.json").read_text())

    def _eudaimonia(self, run: StageRun, model, tok) -> dict:
        from edgebuild.bench import eudaimonia
        with self.progress.step(f"eudaimonia {run.stage}") as update:
            res = eudaimonia.run(model, tok, self.cfg.eudaimonia_scenarios or None, progress=update)
        return {eudaimonia.TASK_NAME: res.to_dict()}

    def _scenarios_fingerprint(self):
        if not self.cfg.eudaimonia:
            return None
        from edgebuild.bench import eudaimonia
        path = Path(self.cfg.eudaimonia_scenarios) if self.cfg.eudaimonia_scenarios else eudaimonia.DEFAULT_PATH
        if not path.is_file():
            raise DataError(f"eudaimonia scenarios file {path} does not exist",
                            hint="set build.eudaimonia_scenarios to a JSONL file, or leave it empty")
        return sha256_file(path)

    def _quality(self, run: StageRun, model, tok) -> dict:
        from edgebuild.bench import quality
        import numpy as np
        texts = self._fixed_texts()
        key = digest("reference-logprobs", self.ref.fingerprint, texts, code_version("bench"))
        entry = self.cache.get("reflogits", key)
        if entry is None:
            base, btok = self._base_model()
            with self.cache.build("reflogits", key) as work:
                np.save(work / "ref.npy", quality.reference_logprobs(base, btok, texts))
            entry = self.cache.path("reflogits", key)
        return quality.compare(model, tok, texts, np.load(entry / "ref.npy"))

    def _device(self, run: StageRun) -> None:
        key = digest("device", 2, run.keys["pack"], run.keys["graph"], self.target.digest(),
                     self._device_tasks(), self._device_profile(), self.cfg.seed,
                     code_version("device_agent", "targets"),
                     code_version("bench") if self._device_tasks() else None)
        entry = self._get("device", key)
        if entry is None:
            result = self._measure_on_device(run)
            if result.get("status") != "ok":
                run.device = result          # never cached: the device may be back next time
                return
            with self.cache.build("device", key) as work:
                write_json_atomic(work / "device.json", result)
            entry = self.cache.path("device", key)
        run.device = json.loads((entry / "device.json").read_text())

    def _measure_on_device(self, run: StageRun) -> dict:
        from edgebuild.targets.client import deploy_stage
        client = self._connect()
        if client is None:
            return self._unreachable(run)
        graph_dir = self.cache.path("graph", run.keys["graph"])
        files = {"model.onnx": graph_dir / "model.onnx", "graph.json": graph_dir / "graph.json",
                 PACKED: Path(run.pack["path"])}
        version = digest(run.keys["pack"], run.keys["graph"])[:16]
        rt = self.target.runtime
        t = self.target.timing
        with self.progress.step(f"upload {run.stage}") as update:
            self._transport.progress = update
            try:
                deploy_stage(client, self._transport, run.stage, version, files)
            finally:
                self._transport.progress = None
        with self.progress.step(f"device {run.stage}"):
            client.load(run.stage, version, threads=rt.threads)
            samples = client.time(prompt_len=t.prompt_len, decode_tokens=t.decode_tokens,
                                  warmup=t.warmup, repeats=t.repeats)
        result = {"status": "ok", "version": version, "info": self._device_info, **samples}
        if self._device_tasks():
            result.update(self._score_on_device(run, client))
        return result

    def _score_on_device(self, run: StageRun, client) -> dict:
        """The device's own benchmark scores (same items and prompts as the host's, fewer of
        them with a smaller device profile) and their agreement with the host's."""
        from edgebuild.bench.devicelm import agreement, run_device
        model, tok = self._base_model()
        tasks = [t for t in self._device_tasks() if t in run.host and run.host[t].get("items")]
        if not tasks:
            return {}
        with self.progress.step(f"device benchmarks {run.stage}") as update:
            dev = run_device(client, tok, tasks, self._device_profile(), self.req.data_dir,
                             self.req.out / "cache" / "data", seed=self.cfg.seed, progress=update,
                             max_length=getattr(model.config, "max_position_embeddings", 2048))
        scores = {t: r.to_dict() for t, r in dev.results.items()}
        both = {t: {i[0] for i in run.host[t]["items"]} & {i[0] for i in scores[t]["items"]} for t in tasks}
        pick = lambda items, t: [i for i in items if i[0] in both[t]]  # noqa: E731
        host = {t: pick(run.host[t]["items"], t) for t in tasks}
        return {"scores": scores, "profile": self._device_profile(),
                "host_scores": {t: sum(c for _, c in host[t]) / len(host[t]) for t in tasks if host[t]},
                "agreement": agreement(host, {t: pick(scores[t]["items"], t) for t in tasks})}

    def _device_profile(self) -> str:
        """The device's profile, never larger than the host's: its items are a subset of the host's."""
        from edgebuild.build.config import PROFILES
        return min(self.cfg.device_profile, self.cfg.profile, key=PROFILES.index)

    def _device_tasks(self) -> list:
        tasks = self.cfg.tasks if self.cfg.device_tasks is None else self.cfg.device_tasks
        return [t for t in tasks if t in self.cfg.tasks]

    def _unreachable(self, run: StageRun) -> dict:
        from edgebuild.targets.spec import predicted_latency
        result = {"status": "unreachable", "error": self._device_state, "target": self.target.name}
        try:
            graph = json.loads((self.cache.path("graph", run.keys["graph"]) / "graph.json").read_text())
            predicted = predicted_latency(self.target, graph)
        except (OSError, ValueError, KeyError, TypeError, EdgebuildError):
            predicted = None
        if predicted:
            result["predicted"] = dict(predicted, label="predicted")
        return result

    def _connect(self):
        if self._device_state is not None:
            return self._client
        from edgebuild.targets import transports
        from edgebuild.targets.client import connect
        try:
            self._transport = transports.get(self.target.connection.transport)(self.target)
            self._client = connect(self.target, self._transport)
            self._device_info = self._client.info()
            self._device_state = "ok"
        except DeviceError as e:
            self._device_state = e.one_line()
            self._client = None
            if self.target.on_unreachable == "fail":
                raise
            log.warning("device unreachable, its gates are not run: %s", e.one_line())
        return self._client

    def _close_device(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except EdgebuildError:
                pass

    # -- models --------------------------------------------------------------------------------
    def _base_model(self):
        if self._base is None:
            with self.progress.step(f"load model {self.ref.spec}"):
                self._base = models.load(self.ref)
        return self._base

    def _stage_model(self, source: StageRun | None):
        model, tok = self._base_model()
        if source is None or source.stage == "baseline":
            return copy.deepcopy(model), tok
        return self._model_for(source)

    def _model_for(self, run: StageRun):
        """The torch model carrying this stage's decoded weights (cached per stage run)."""
        cached = getattr(run, "_model", None)
        if cached is not None:
            return cached
        from edgebuild.compress import apply_records
        from edgebuild.device_agent import packed
        model, tok = self._base_model()
        if run.stage != "baseline":
            model = copy.deepcopy(model)
            _, records = packed.read(run.pack["path"])
            apply_records(model, records)
        run._model = (model, tok)
        return run._model

    def _decoded(self, run: StageRun) -> dict:
        from edgebuild.device_agent import codecs, packed
        _, records = packed.read(run.pack["path"])
        return codecs.decode_all(records)


def _with_items(result: dict, items: list, bench, docs: list) -> dict:
    """A task result carrying ``items`` (sorted by doc id), with score, n and chance recomputed
    (plain means: adaptive sampling extends unstratified tasks only)."""
    items = sorted(([int(d), float(c)] for d, c in items), key=lambda item: item[0])
    chance = sum(bench.chance_of(docs[d]) for d, _ in items) / len(items)
    return dict(result, items=items, n=len(items), score=sum(c for _, c in items) / len(items),
                chance=chance, stderr=None)


def _raw_records(model) -> list:
    """The uncompressed model: every tensor as float32 (the tied lm_head is not stored twice)."""
    from edgebuild.device_agent.packed import Record
    out = []
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        arr = t.detach().float().cpu().numpy()
        out.append(Record(name, tuple(arr.shape), "raw", {"dtype": "float32"}, {"data": arr}))
    return out


def _device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"
