"""Checks of a runtime directory against torch, and what deploying a stage costs in quality.

``verify_runtime`` compares a runtime directory with the torch model carrying its deployed weights
(``deployed.deployed_model``) on fixed prompts, in two ways:

* weights: the runtime's graph with every ``MatMulNBits`` switched to float compute
  (``accuracy_level`` 1), prefill in onnxruntime, against torch. Only float32 rounding separates
  them, so this proves the deployed state dict is exactly what the device multiplies by;
* runtime: the graph as the device runs it, in onnxruntime-genai (prefill and greedy KV-cached
  decode). An all-float runtime, or a low-bit one computing in float, must give torch's greedy
  tokens; with ``accuracy_level`` 4 the activations are also rounded to int8 per block, so the
  check is on top-1 agreement and the largest logit difference, with the tolerances below.

What deploying costs in quality (KL(stage as compressed || stage as deployed)) is measured with the
build's quality machinery: ``edgebuild.bench.quality.deployment_kl`` and ``runtime_kl``.
"""
from __future__ import annotations

import logging

import numpy as np

from edgebuild.export.base import ExportError
from edgebuild.export.onnx_graph import DEFAULT_PROMPTS, _prompt_ids

log = logging.getLogger(__name__)

DECODE_STEPS = 8
# Float compute vs torch: the exporter's own bound for float graphs (see onnx_graph.TOLERANCE).
# Measured on SmolLM2-135M: fp32 runtime 9e-5, int4 g32 with float compute 1.3e-4.
FLOAT_MAX_DIFF = 2e-3
# int8 activations (accuracy_level 4) vs torch with the deployed weights, on the default prompts:
# measured on SmolLM2-135M (logits up to ~35), int4/int8 at blocks 32-128: largest difference
# 1.1-4.5, top-1 agreement 0.90-0.97 (mean over prompts; 0.83 on one prompt). The weights check
# above holds these runtimes to FLOAT_MAX_DIFF, so the looser bound only covers activation rounding.
INT8_COMPUTE_MAX_DIFF = 6.0
INT8_COMPUTE_MIN_TOP1 = 0.85


def _compare(runtime, model, ids: list, steps: int) -> dict:
    import torch

    tokens, rows = runtime.greedy(ids, steps, stop_at_eos=False)
    ours = np.concatenate([runtime.logits(ids)[:-1], rows])
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids + tokens[:-1]])).logits[0].float().numpy()
    greedy_ref = ref[len(ids) - 1:].argmax(axis=-1)
    return {"max_abs_diff": float(np.abs(ours - ref).max()),
            "top1": float((ours.argmax(-1) == ref.argmax(-1)).mean()),
            "greedy_match": bool((greedy_ref == np.asarray(tokens)).all())}


def _float_compute_session(folder, threads):
    """An onnxruntime session of the runtime graph with every MatMulNBits computing in float."""
    import onnxruntime as ort

    from edgebuild.export.deployed import load_graph

    graph, _ = load_graph(folder)
    for node in graph.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = 1
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    return ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _prefill(session, ids: list, decoder: dict) -> np.ndarray:
    feeds = {"input_ids": np.asarray([ids], dtype=np.int64),
             "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
    empty = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), dtype=np.float32)
    feeds.update((v.name, empty) for v in session.get_inputs() if v.name.startswith("past_key_values."))
    return session.run(["logits"], feeds)[0][0]


def check_deployed_weights(folder, deployed, tokenizer, prompts=None, threads=None) -> dict:
    """Prefill logits of the runtime graph computing in float against torch with the deployed
    weights; ``ExportError`` beyond ``FLOAT_MAX_DIFF``. Returns ``{"max_abs_diff", "tolerance"}``."""
    import torch

    import json
    from pathlib import Path

    from edgebuild.device_agent import runtime_dir

    session = _float_compute_session(folder, threads)
    decoder = json.loads((Path(folder) / runtime_dir.GENAI_CONFIG).read_text())["model"]["decoder"]
    worst = 0.0
    for prompt in (list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)):
        ids = _prompt_ids(prompt, tokenizer)
        with torch.no_grad():
            ref = deployed(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        worst = max(worst, float(np.abs(_prefill(session, ids, decoder) - ref).max()))
    if not worst <= FLOAT_MAX_DIFF:
        raise ExportError(f"runtime {folder}: its weights computed in float differ from torch with the "
                          f"deployed weights by {worst:.3g} (tolerance {FLOAT_MAX_DIFF:g}); the "
                          f"deployed state dict is not what the device runs")
    return {"max_abs_diff": worst, "tolerance": FLOAT_MAX_DIFF}


def _int8_compute(manifest: dict) -> bool:
    low_bit = set(manifest["encodings"].values()) != {"fp32"}
    return low_bit and manifest["knobs"].get("accuracy_level", 0) >= 4


def verify_runtime(folder, deployed, tokenizer, prompts=None, *, steps: int = DECODE_STEPS,
                   threads: int | None = None) -> dict:
    """Check the runtime directory ``folder`` against the torch model ``deployed`` (carrying
    ``deployed_state_dict(folder)``) on ``prompts`` (default: fixed ones): its weights
    (``check_deployed_weights``), then the runtime as the device runs it (onnxruntime-genai).

    Returns ``{"weights", "max_abs_diff", "top1_agreement", "greedy_match", "int8_compute",
    "tolerances", ...}``; raises ``ExportError`` when a check fails.
    """
    from edgebuild.device_agent.genai_runtime import GenaiRuntime

    prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    weights = check_deployed_weights(folder, deployed, tokenizer, prompts, threads)
    runtime = GenaiRuntime.load(folder, threads=threads)
    int8 = _int8_compute(runtime.manifest)
    per_prompt = [_compare(runtime, deployed, _prompt_ids(p, tokenizer), steps) for p in prompts]
    result = {"weights": weights, "max_abs_diff": max(p["max_abs_diff"] for p in per_prompt),
              "top1_agreement": float(np.mean([p["top1"] for p in per_prompt])),
              "greedy_match": all(p["greedy_match"] for p in per_prompt), "int8_compute": int8,
              "prompts": len(prompts), "steps": steps, "per_prompt": per_prompt,
              "tolerances": {"max_abs_diff": INT8_COMPUTE_MAX_DIFF if int8 else FLOAT_MAX_DIFF,
                             "top1_agreement": INT8_COMPUTE_MIN_TOP1 if int8 else 1.0}}
    _judge(result, runtime.manifest.get("label", str(folder)))
    return result


def _judge(result: dict, label: str) -> None:
    tol = result["tolerances"]
    if not result["int8_compute"] and not result["greedy_match"]:
        raise ExportError(f"runtime {label}: greedy tokens differ from torch's; a runtime computing "
                          f"in float must decode exactly as torch does")
    if not result["max_abs_diff"] <= tol["max_abs_diff"]:      # also catches NaN
        raise ExportError(f"runtime {label}: logits differ from torch with the deployed weights by "
                          f"{result['max_abs_diff']:.3g} (tolerance {tol['max_abs_diff']:g})")
    if result["top1_agreement"] < tol["top1_agreement"]:
        raise ExportError(f"runtime {label}: top-1 agreement with torch is "
                          f"{result['top1_agreement']:.3f} (needs {tol['top1_agreement']:g})")
    log.info("runtime %s: max |logit diff| %.3g, top-1 %.3f, greedy match %s", label,
             result["max_abs_diff"], result["top1_agreement"], result["greedy_match"])
