"""The sections of the build report, in page order, shared by report.html and report.md.

A section is a name, a title and a function from the manifest to the values its templates show;
``templates/html/<name>.html.j2`` and ``templates/md/<name>.md.j2`` render it (a format without a
template for the section leaves it out). Every template also sees ``m`` (the manifest), ``plots``
(``{name: PNG bytes}``, HTML only) and ``summary`` (the per-stage rows of ``summary.as_dict``, when
the report is written at the end of a build). Adding a section is a function here, an entry in
``SECTIONS`` and its template(s).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from edgebuild.build.views import compression_ratio, label, score_table
from edgebuild.core.errors import EXIT_CODE_HELP, ExitCode


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    values: Callable[[dict], dict] | None = None   # manifest -> the template's values (None: none)


def banner(m: dict) -> dict:
    code = m.get("exit_code")
    try:
        meaning = EXIT_CODE_HELP[ExitCode(code)]
    except (ValueError, TypeError):
        meaning = "unknown exit code"
    return {"code": code, "meaning": meaning, "ok": code == 0 and bool(m.get("ready_for_edge_deployment"))}


def benchmarks(m: dict) -> dict:
    """The benchmark × stage table (``views.score_table``), the one the W&B run logs."""
    return {"table": score_table(m)}


def stages(m: dict) -> dict:
    rows = []
    for st in m.get("stages", []):
        q, x = st.get("quality") or {}, st.get("export_check") or {}
        rows.append({"label": label(st), "st": st, "ratio": compression_ratio(m, st), "kl": q.get("kl"),
                     "top1": q.get("top1_agreement"), "max_abs_diff": x.get("max_abs_diff")})
    return {"rows": rows}


def latency(m: dict) -> dict:
    rows = []
    for st in m.get("stages", []):
        lat = st.get("latency") or {}
        n = len((lat.get("samples") or {}).get("decode_ms_per_token") or [])
        rows.append({"label": label(st), "lat": lat, "samples": n or None,
                     "status": "measured" if lat.get("measured") else lat.get("status", "not run")})
    return {"rows": rows}


def runtime(m: dict) -> dict:
    """What the device executes for each stage: encodings, transport (packed) and runtime bytes,
    KL(stage || stage as deployed) beside the stage's own KL, the runtime's agreement with torch,
    the runtime weights' sha256 and whether the device computed the same."""
    rows = []
    for st in m.get("stages", []):
        rt = st.get("runtime")
        if not rt:
            continue
        lat, verify = st.get("latency") or {}, rt.get("verify") or {}
        rows.append({"label": label(st), "rt": rt, "kl": (st.get("quality") or {}).get("kl"),
                     "deployment_kl": (rt.get("deployment") or {}).get("kl"), "verify": verify,
                     "transport_mb": (rt.get("transport_bytes") or 0) / 1e6, "runtime_mb": (rt.get("bytes") or 0) / 1e6,
                     "weights_mb": (rt.get("weights_bytes") or 0) / 1e6, "sha": (rt.get("weights_sha256") or "")[:16],
                     "device_match": (lat.get("weights") or {}).get("match") if lat.get("measured") else None,
                     "stage_rss_mb": lat.get("stage_rss_mb"), "load_s": lat.get("load_s")})
    return {"rows": rows}


def boards(m: dict) -> dict:
    """On a labgrid group: for each stage, every board that served it, the benchmark requests it
    scored, whether timing and memory were measured there, and why it was lost, if it was."""
    rows = []
    for st in m.get("stages", []):
        lat = st.get("latency") or {}
        served = lat.get("boards") or {}
        for board in served.get("places", []):
            rows.append({"label": label(st), "board": board, "requests": (served.get("items") or {}).get(board, 0),
                         "measured": board == lat.get("board"), "lost": (served.get("lost") or {}).get(board)})
    return {"rows": rows}


def device_scores(m: dict) -> dict:
    """Each stage's host and device scores side by side, with their agreement."""
    rows = []
    for st in m.get("stages", []):
        dev = st.get("device_scores") or {}
        agree = (dev.get("agreement") or {}).get("tasks") or {}
        for task, d in (dev.get("tasks") or {}).items():
            a = agree.get(task, {})
            rows.append({"label": label(st), "task": task, "host_score": d.get("host_score"),
                         "score": d.get("score"), "n": d.get("n"), "profile": dev.get("profile"),
                         "same_prediction": a.get("same_prediction"), "max_loglik_diff": a.get("max_loglik_diff"),
                         "per_token": a.get("max_loglik_diff_per_token")})
    return {"rows": rows}


def gates(m: dict) -> dict:
    """Every attempt's gate: checks, reasons, whether it was critical, and what the method ran with."""
    attempts = []
    for st in m.get("stages", []):
        gate = st.get("gate") or {}
        attempts.append({"label": label(st), "st": st, "checks": gate.get("checks", []),
                         "reasons": gate.get("reasons") or [], "critical": gate.get("critical"),
                         "facts": {k: facts_line(v) for k, v in sorted((st.get("method_facts") or {}).items())}})
    return {"attempts": attempts}


def facts_line(facts) -> str:
    """A method's recorded facts on one line: numbers rounded, nested tables left out."""
    if not isinstance(facts, dict):
        return str(facts)
    flat = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in facts.items()
            if not isinstance(v, (dict, list))}
    return json.dumps(flat, sort_keys=True)


def search(m: dict) -> dict:
    """Every trial of every compressed stage (``manifest["search"]``), with where it compressed from."""
    notes = {}
    for st in m.get("stages", []):
        notes.setdefault(st["stage"], st.get("note") or "")
    trials, ahead = m.get("search") or {}, m.get("compressed_ahead") or {}
    return {"stages": [{"stage": stage, "note": notes[stage], "trials": trials[stage], "ahead": ahead.get(stage)}
                       for stage in notes if stage in trials],
            "trials": sum(len(t) for t in (m.get("search") or {}).values())}


def not_evaluated(m: dict) -> dict:
    """The gates no stage was judged on, and the benchmarks the device did not score, with why."""
    device = {}
    for st in m.get("stages", []):
        device.update((st.get("device_scores") or {}).get("excluded") or {})
    return {"host": sorted((m.get("gates_not_evaluated") or {}).items()), "device": sorted(device.items())}


def extras(m: dict) -> dict:
    """The edge-of-chaos and eudaimonia results of the shipped stage."""
    out = []
    for key, title in (("edge_of_chaos", "Edge of chaos"), ("eudaimonia", "Eudaimonia")):
        section = m.get(key) or {}
        out.append({"title": title, "measured": section.get("measured") is not False,
                    "reason": section.get("reason", ""), "items": sorted(section.items())})
    return {"extras": out}


def device(m: dict) -> dict:
    """The target's machine as its agent reported it, and whether its timings were measured on
    real hardware or under emulation."""
    facts = m.get("device_facts") or {}
    return {"target": m.get("target"), "emulated": m.get("device_measurement") == "emulated",
            "items": [(k, facts[k]) for k in facts if facts[k] is not None]}


def artifacts(m: dict) -> dict:
    return {"rows": (m.get("artifacts") or {}).get(m.get("compression_level"), [])}


def method_facts(m: dict) -> dict:
    return {"items": [(label(st), json.dumps(st["method_facts"], sort_keys=True, indent=1, default=str))
                      for st in m.get("stages", []) if st.get("method_facts")]}


SECTIONS = (
    Section("banner", "Outcome", banner),
    Section("summary", "Build"),
    Section("stage_runs", "Stages"),              # Markdown: the table printed at the end of a build
    Section("benchmarks", "Benchmarks", benchmarks),
    Section("stages", "Stages", stages),
    Section("device", "Device", device),
    Section("runtime", "What the device executes", runtime),
    Section("latency", "Device latency", latency),
    Section("boards", "Boards of the group", boards),
    Section("device_scores", "Host and device scores", device_scores),
    Section("gates", "Gate verdicts", gates),
    Section("search", "Search: every trial", search),
    Section("not_evaluated", "Not evaluated", not_evaluated),
    Section("path", "Path taken"),
    Section("extras", "Edge of chaos and eudaimonia", extras),
    Section("plots", "Plots"),
    Section("artifacts", "Artifacts", artifacts),
    Section("method_facts", "Method facts", method_facts),
)


def sections(fmt: str, manifest: dict) -> list:
    """``[(section, its template, its values)]`` of the sections format ``fmt`` ("html", "md") renders."""
    from edgebuild.build.templating import has_template
    out = []
    for s in SECTIONS:
        template = f"{fmt}/{s.name}.{fmt}.j2"
        if has_template(template):
            out.append((s, template, s.values(manifest) if s.values else {}))
    return out
