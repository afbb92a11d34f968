"""Human-readable build report (Markdown), written next to the manifest."""
from __future__ import annotations

import json
from pathlib import Path

from edgebuild.build.summary import as_dict
from edgebuild.core.files import write_text_atomic


def write_reports(result, manifest_path: Path) -> Path:
    manifest = json.loads(Path(manifest_path).read_text())
    path = result.out_dir / "report.md"
    return write_text_atomic(path, render_markdown(result, manifest))


def render_markdown(result, manifest: dict) -> str:
    data = as_dict(result)
    tasks = list(data["stages"][0]["tasks"]) if data["stages"] else []
    lines = [f"# edgebuild report: {manifest['model']} → {manifest['target']}", "",
             f"Shipped stage: **{manifest['compression_level']}** (exit code {manifest['exit_code']}); "
             f"ready for edge deployment: **{manifest['ready_for_edge_deployment']}**.", "",
             "| stage | method | bytes | bits/weight | " + " | ".join(tasks) + " | KL | decode ms/token | verdict |",
             "|" + "---|" * (7 + len(tasks))]
    for r in data["stages"]:
        method = r["method"] + (" (reference method)" if r["reference_method"] else "")
        cells = [f"{c['score']:.3f} (n={c['n']})" if c else "—" for c in (r["tasks"].get(t) for t in tasks)]
        lines.append(f"| {r['stage']}#{r['attempt']} | {method} | {r['bytes'] or '—'} | "
                     f"{_f(r['bits_per_weight'])} | " + " | ".join(cells) +
                     f" | {_f(r['kl'], '.4f')} | {_f(r['decode_ms_per_token_p50'], '.1f')} | {r['status']} |")
    lines += ["", "## Gate checks", ""]
    for st in manifest["stages"]:
        lines.append(f"### {st['stage']} attempt {st['attempt'] + 1}: {st['status']}")
        lines.append(f"- method `{st['method']}` knobs `{json.dumps(st['knobs'], sort_keys=True)}`"
                     + (" (reference method)" if st.get("reference_method") else ""))
        for method, facts in sorted((st.get("method_facts") or {}).items()):
            lines.append(f"- {method} facts: `{_facts(facts)}`")
        for c in st["gate"].get("checks", []):
            lines.append(f"- `{c['name']}` {c['verdict']}: {c['detail']}")
        lines.append("")
    lines += _device_section(manifest)
    lines += ["## Path taken", "", " → ".join(manifest["fallback_path"]), ""]
    return "\n".join(lines)


def _facts(facts) -> str:
    """The method's recorded facts, numbers rounded, nested tables left out."""
    if not isinstance(facts, dict):
        return str(facts)
    flat = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in facts.items()
            if not isinstance(v, (dict, list))}
    return json.dumps(flat, sort_keys=True)


def _f(v, spec=".2f") -> str:
    return "—" if v is None else format(v, spec)


def _device_section(manifest: dict) -> list:
    """Host and device scores side by side, with their agreement on the items both scored."""
    rows = []
    for st in manifest["stages"]:
        dev = st.get("device_scores")
        if not dev:
            continue
        agree = dev.get("agreement") or {}
        for task, d in dev["tasks"].items():
            a = (agree.get("tasks") or {}).get(task, {})
            rows.append(f"| {st['stage']}#{st['attempt']} | {task} | {_f(d.get('host_score'), '.3f')} | "
                        f"{d['score']:.3f} (n={d['n']}, {dev.get('profile')}) | "
                        f"{_f(a.get('same_prediction'), '.3f')} | {_f(a.get('max_loglik_diff'), '.2e')} |")
    if not rows:
        return []
    return ["## Host and device", "",
            "Device scores come from the agent (onnxruntime on the target) on the first items of the "
            "host's seeded sample; agreement is over the items both scored.", "",
            "| stage | task | host score (same items) | device score | same prediction | max log-lik diff |",
            "|---|---|---|---|---|---|", *rows, ""]
