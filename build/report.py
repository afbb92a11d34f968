"""Human-readable build report (Markdown), written next to the manifest."""
from __future__ import annotations

import json
from pathlib import Path

from edgebuild.build.summary import as_dict


def write_reports(result, manifest_path: Path) -> Path:
    manifest = json.loads(Path(manifest_path).read_text())
    path = result.out_dir / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text(render_markdown(result, manifest))
    tmp.replace(path)
    return path


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
