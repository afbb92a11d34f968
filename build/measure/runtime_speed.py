"""``edgebuild measure runtime`` (``make bench-runtime``): every runtime encoding of a model next to llama.cpp.

One run, one table, this machine, the same threads and the same prompt for every row: the fp32
baseline as the agent ran it before runtime encodings (float graph + packed weights), then each
runtime encoding (fp32, int8, int4 at the block sizes supported, float or int8 compute, an fp32
embedding as the fallback for an older onnxruntime), each compressed stage of a finished build
when ``--build-dir`` is given, and llama.cpp on the same model: the Q4_1 GGUF it ships as and
llama.cpp's own Q8_0 / Q4_0 requantisations of it. Per row: bytes on disk, resident memory of a
fresh process that loads and runs only that row (``device_agent.isolated`` / ``llama_ref``),
prefill and decode tokens/s (medians of the repeats), KL of next-token distributions against the
float32 torch baseline on LAMBADA text, and the ratios to the fp32 baseline and to llama.cpp Q4_1.

    edgebuild measure runtime --model smollm2-135m --data-dir DATA [--build-dir out/demo/local]
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgebuild.export.encodings import Knobs, RuntimePlan

log = logging.getLogger(__name__)

BASELINE = "agent fp32 (float graph + packed weights)"
LLAMA_REFERENCE = "llama.cpp Q4_1 (as shipped)"
INT8_NOTE = ("≈ lossless here: the model was dequantised from Q4_1, whose 16 levels per block 8-bit "
             "blocks reproduce almost exactly")
INT4_NOTE = ("not lossless although the model came from Q4_1 (asymmetric 4-bit, blocks of 32): MatMulNBits "
             "zero points are integers, so Q4_1's float minimum cannot be kept; a fresh 4-bit rounding")


@dataclass
class Timing:
    threads: int = 2
    prompt_len: int = 64
    decode_tokens: int = 128
    warmup: int = 1
    repeats: int = 3


@dataclass
class Row:
    label: str
    kind: str                                  # "agent", "runtime", "stage", "llama"
    path: Path
    note: str = ""
    plan: RuntimePlan | None = None
    extra: dict = field(default_factory=dict)


def encoding_rows() -> list:
    """``[(label, plan, note)]`` of the runtime encodings measured by default."""
    sym, asym = Knobs(block_size=32), Knobs(block_size=32, symmetric=False)
    return [
        ("runtime fp32", RuntimePlan("fp32", "fp32", sym), "the same graph layout with float weights"),
        ("runtime int8 g32", RuntimePlan("int8", "int8", sym), INT8_NOTE),
        ("runtime int4 g32", RuntimePlan("int4", "int4", sym), INT4_NOTE + " (the default encoding)"),
        ("runtime int4 g32 asym", RuntimePlan("int4", "int4", asym), "integer zero points: the range holds 0"),
        ("runtime int4 g64", RuntimePlan("int4", "int4", Knobs(block_size=64)), ""),
        ("runtime int4 g128", RuntimePlan("int4", "int4", Knobs(block_size=128)),
         "embedding in blocks of 64 (576 is no multiple of 128); K padded to 640"),
        ("runtime int4 g32, int8 embedding", RuntimePlan("int4", "int8", sym),
         "the embedding/head came as 8-bit in the GGUF: kept near-lossless"),
        ("runtime int4 g32 float compute", RuntimePlan("int4", "int4", Knobs(block_size=32, accuracy_level=1)),
         "accuracy_level 1: CPUs without int8 dot products (rpi4)"),
        ("runtime int4 g32, fp32 embedding", RuntimePlan("int4", "fp32", sym),
         "the fallback for an onnxruntime without GatherBlockQuantized"),
    ]


def _encoded(folder: Path, plan: RuntimePlan, fingerprint: str) -> bool:
    try:
        manifest = json.loads((folder / "runtime.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("meta", {}) == {"model": fingerprint, "plan": plan.to_dict()}


def runtime_row(label, plan, note, model, tok, fingerprint, work: Path, **weights) -> Row:
    """Encode (unless an up-to-date encoding is in ``work``) and describe one runtime row."""
    from edgebuild.export.runtime_build import encode_stage

    folder = work / label.replace(" ", "-").replace(",", "").replace("/", "-")
    if not _encoded(folder, plan, fingerprint):
        if not weights:
            weights = {"state": {k: v.numpy() for k, v in model.state_dict().items()}}
        encode_stage(model, tok, folder, plan, meta={"model": fingerprint, "plan": plan.to_dict()}, **weights)
    return Row(label, "runtime", folder, note, plan)


def baseline_row(model, tok, work: Path) -> Row:
    """The agent's format before runtime encodings: the float graph and float32 packed weights."""
    from edgebuild.compress.packing import raw_record, tied_output_name
    from edgebuild.device_agent import packed
    from edgebuild.export.onnx_graph import OnnxExporter

    folder = work / "agent-fp32"
    if not (folder / "weights.ebpk").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        OnnxExporter().export(model, tok, folder)
        tied = tied_output_name(model)
        records = [raw_record(n, t, "float32") for n, t in model.state_dict().items() if n != tied]
        packed.write(folder / "weights.ebpk", records)
    return Row(BASELINE, "agent", folder, "the agent before runtime encodings: every stage ran like this")


def stage_rows(build_dir: Path, plan: RuntimePlan, model, tok, fingerprint, work: Path) -> list:
    """One runtime row per compressed stage of a finished build, encoded with ``plan``."""
    from edgebuild.core.errors import UsageError
    from edgebuild.device_agent import packed

    path = build_dir / "manifest.json"
    if not path.is_file():
        raise UsageError(f"no build at {build_dir} (manifest.json missing)", hint="run `edgebuild all` first")
    manifest, rows = json.loads(path.read_text()), []
    for stage, artifacts in manifest["artifacts"].items():
        weights = [build_dir / a["path"] for a in artifacts if a["path"].endswith(".ebpk")]
        if stage == "baseline" or not weights:
            continue
        records = packed.read(weights[0])[1]
        row = runtime_row(f"stage {stage} ({plan.label()})", plan, "transcoded from the stage's weights",
                          model, tok, fingerprint, work / "stages", records=records)
        row.kind, row.extra["records"] = "stage", records
        rows.append(row)
    return rows


def llama_rows(model_name: str, work: Path) -> list:
    from edgebuild.build.measure import llama_ref

    files = llama_ref.gguf_files(model_name, work / "gguf")
    return [Row(LLAMA_REFERENCE, "llama", files["shipped"],
                "lossless here: the weights the baseline was dequantised from (KL: int8 activations)"),
            Row("llama.cpp Q8_0 (requantised)", "llama", files["Q8_0"], "8 bits hold Q4_1's levels"),
            Row("llama.cpp Q4_0 (requantised)", "llama", files["Q4_0"],
                "symmetric 4-bit, embedding kept at Q8_0 (576 is no multiple of 256)")]


def measure_speed(row: Row, timing: Timing) -> dict:
    """Timing and memory of ``row`` in a fresh process."""
    from edgebuild.build.measure import llama_ref
    from edgebuild.device_agent import isolated

    args = dict(prompt_len=timing.prompt_len, decode_tokens=timing.decode_tokens,
                warmup=timing.warmup, repeats=timing.repeats)
    if row.kind == "llama":
        return llama_ref.time_isolated(row.path, timing.threads, **args)
    return isolated.measure_isolated(row.path, timing.threads, **args)


def _quality_model(row: Row, threads: int):
    from edgebuild.device_agent.isolated import load_stage
    from edgebuild.bench.quality import RuntimeModel

    if row.kind == "llama":
        from edgebuild.build.measure.llama_ref import LlamaModel
        return LlamaModel(row.path, threads)
    return RuntimeModel(load_stage(row.path, threads))


def measure_quality(row: Row, tok, texts, ref, threads: int) -> dict:
    """KL etc. of the row's own logits against the baseline reference ``ref``."""
    from edgebuild.bench import quality

    return quality.compare(_quality_model(row, threads), tok, texts, ref)


def deployment_cost(row: Row, model, tok, texts) -> dict:
    """KL(stage as compressed || stage as deployed) of a stage row (torch, deployed weights)."""
    from edgebuild.compress import apply_records
    from edgebuild.export.deployed import deployed_model
    from edgebuild.bench.quality import deployment_kl
    import copy

    stage = copy.deepcopy(model)
    apply_records(stage, row.extra["records"])
    return deployment_kl(stage, deployed_model(model, row.path), tok, texts)


def rates(samples: dict, prompt_len: int) -> dict:
    prefill = statistics.median(samples["prefill_ms"])
    decode = statistics.median(samples["decode_ms_per_token"])
    return {"prefill_tok_s": prompt_len / prefill * 1e3, "decode_tok_s": 1e3 / decode}


def _bytes_on_disk(row: Row, speed: dict) -> int:
    return int(speed.get("stored_bytes") or Path(row.path).stat().st_size)


def measure_row(row: Row, timing: Timing, model, tok, texts, ref) -> dict:
    speed = measure_speed(row, timing)
    out = {"label": row.label, "kind": row.kind, "path": str(row.path), "note": row.note,
           "bytes": _bytes_on_disk(row, speed), "rss_mb": speed["peak_rss_mb"],
           "load_s": speed.get("load_s"), **rates(speed, timing.prompt_len), "samples": speed,
           "quality": measure_quality(row, tok, texts, ref, timing.threads)}
    if row.plan is not None:
        out["plan"] = row.plan.to_dict()
    if row.kind == "stage":
        out["deployment"] = deployment_cost(row, model, tok, texts)
    print(json.dumps({k: out[k] for k in ("label", "bytes", "rss_mb", "prefill_tok_s", "decode_tok_s")}),
          file=sys.stderr, flush=True)
    return out


def plan_rows(model_spec: str, model, tok, work: Path, build_dir, stage_plan, llama: bool) -> list:
    from edgebuild.core import models

    fingerprint = models.resolve(model_spec).fingerprint
    rows = [baseline_row(model, tok, work)]
    rows += [runtime_row(label, plan, note, model, tok, fingerprint, work) for label, plan, note in encoding_rows()]
    if build_dir is not None:
        rows += stage_rows(Path(build_dir), stage_plan, model, tok, fingerprint, work)
    if llama:
        rows += llama_rows(model_spec, work)
    return rows


def run(model_spec: str, data_dir, work: Path, *, build_dir=None, stage_plan=None, timing=None,
        llama: bool = True, on_row=None) -> dict:
    """Measure every row; ``{"rows": [...], "conditions": {...}}``."""
    from edgebuild.bench import quality
    from edgebuild.core import models
    from edgebuild.core.errors import UsageError

    if llama and model_spec not in models.EMBEDDED:
        raise UsageError(f"llama.cpp rows need an embedded model (its GGUF), not {model_spec!r}",
                         hint="pass --no-llama")
    timing = timing or Timing()
    model, tok = models.load(models.resolve(model_spec))
    texts = quality.quality_texts(data_dir)
    ref = quality.reference_logprobs(model, tok, texts)
    rows = plan_rows(model_spec, model, tok, Path(work), build_dir, stage_plan or RuntimePlan(), llama)
    conditions = {"model": model_spec, "threads": timing.threads, "prompt_len": timing.prompt_len,
                  "decode_tokens": timing.decode_tokens, "warmup": timing.warmup,
                  "repeats": timing.repeats, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    measured = []
    for row in rows:
        measured.append(measure_row(row, timing, model, tok, texts, ref))
        if on_row is not None:
            on_row({"rows": measured, "conditions": conditions})
    conditions["loadavg_end"] = os.getloadavg()
    return {"rows": add_ratios(measured), "conditions": conditions}


def add_ratios(rows: list) -> list:
    """Decode and memory ratios to the fp32 baseline and to llama.cpp Q4_1 (when measured)."""
    base = next((r for r in rows if r["label"] == BASELINE), None)
    ref = next((r for r in rows if r["label"] == LLAMA_REFERENCE), None)
    for r in rows:
        if base:
            r["decode_vs_fp32"] = r["decode_tok_s"] / base["decode_tok_s"]
            r["rss_vs_fp32"] = r["rss_mb"] / base["rss_mb"]
        if ref:
            r["decode_vs_q4_1"] = r["decode_tok_s"] / ref["decode_tok_s"]
    return rows


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else "-"


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = result["conditions"]
    table = Table(title=f"runtime encodings of {c['model']} vs llama.cpp: {c['threads']} threads, prompt "
                        f"{c['prompt_len']} tokens, decode {c['decode_tokens']} tokens, median of "
                        f"{c['repeats']} (after {c['warmup']} warm-up), a fresh process per row")
    columns = ("row", "MB on disk", "RSS MB", "prefill tok/s", "decode tok/s", "decode ×fp32",
               "decode ×Q4_1", "RSS ×fp32", "KL vs fp32", "top-1", "note")
    for col in columns:
        table.add_column(col, justify="left" if col in ("row", "note") else "right")
    for r in result["rows"]:
        q = r["quality"]
        note = r["note"]
        if "deployment" in r:
            note = f"{note}; KL compressed→deployed {r['deployment']['kl']:.4f}".lstrip("; ")
        table.add_row(r["label"], f"{r['bytes'] / 1e6:.1f}", f"{r['rss_mb']:.0f}", f"{r['prefill_tok_s']:.0f}",
                      f"{r['decode_tok_s']:.1f}", _ratio(r, "decode_vs_fp32"), _ratio(r, "decode_vs_q4_1"),
                      _ratio(r, "rss_vs_fp32"), f"{q['kl']:.4f}", f"{q['top1_agreement']:.3f}", note)
    console = Console(width=220)
    console.print(table)
    console.print(f"load average {c['loadavg_start'][0]:.1f} at the start, "
                  f"{c.get('loadavg_end', ['?'])[0]} at the end, on {c['cpus']} CPUs "
                  f"(timings taken while the machine is shared are indicative).")
