"""Checks of a runtime directory against torch, and what deploying a stage costs in quality.

``verify_runtime`` runs the runtime in onnxruntime-genai (the device's decode loop) and the torch
model carrying the deployed weights (``deployed.deployed_model``) on fixed prompts, prefill and
greedy KV-cached decode, and compares logits. The two differ only by the runtime's arithmetic:
for an all-float runtime that is float32 rounding and the greedy tokens must be identical; a
low-bit runtime with ``accuracy_level`` 4 also rounds the activations to int8 per block, so its
check is on top-1 agreement and the largest logit difference, with the tolerances below.

``deployment_kl`` measures KL(stage as compressed || stage as deployed) on text, with the same
machinery as the build's quality gate (``edgebuild.bench.quality``).
"""
from __future__ import annotations

import logging

import numpy as np

from edgebuild.export.base import ExportError
from edgebuild.export.onnx_graph import DEFAULT_PROMPTS, _prompt_ids

log = logging.getLogger(__name__)

DECODE_STEPS = 8
# float32 runtime vs torch: the exporter's own bound for float graphs (see onnx_graph.TOLERANCE).
FLOAT_MAX_DIFF = 2e-3
# Low-bit runtime (int8 activations at accuracy_level 4) vs torch with the deployed weights, on the
# default prompts: measured on SmolLM2-135M, int4/int8 at block sizes 32-128 (largest difference
# 0.05-0.12 logits, top-1 agreement 1.0); a wrong weight or layout moves logits by whole units.
LOWBIT_MAX_DIFF = 0.5
LOWBIT_MIN_TOP1 = 0.95


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


def verify_runtime(folder, deployed, tokenizer, prompts=None, *, steps: int = DECODE_STEPS,
                   threads: int | None = None) -> dict:
    """Compare the runtime directory ``folder`` (onnxruntime-genai) with the torch model
    ``deployed`` (carrying ``deployed_state_dict(folder)``) on ``prompts`` (default: fixed ones).

    Returns ``{"max_abs_diff", "top1_agreement", "greedy_match", "float", "tolerances", ...}``;
    raises ``ExportError`` when a float runtime's greedy tokens differ or a tolerance is exceeded.
    """
    from edgebuild.device_agent.genai_runtime import GenaiRuntime

    runtime = GenaiRuntime.load(folder, threads=threads)
    is_float = set(runtime.manifest["encodings"].values()) == {"fp32"}
    prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    per_prompt = [_compare(runtime, deployed, _prompt_ids(p, tokenizer), steps) for p in prompts]
    result = {"max_abs_diff": max(p["max_abs_diff"] for p in per_prompt),
              "top1_agreement": float(np.mean([p["top1"] for p in per_prompt])),
              "greedy_match": all(p["greedy_match"] for p in per_prompt), "float": is_float,
              "prompts": len(prompts), "steps": steps, "per_prompt": per_prompt,
              "tolerances": {"max_abs_diff": FLOAT_MAX_DIFF if is_float else LOWBIT_MAX_DIFF,
                             "top1_agreement": 1.0 if is_float else LOWBIT_MIN_TOP1}}
    _judge(result, runtime.manifest.get("label", str(folder)))
    return result


def _judge(result: dict, label: str) -> None:
    tol = result["tolerances"]
    if result["float"] and not result["greedy_match"]:
        raise ExportError(f"runtime {label}: greedy tokens differ from torch's; the float runtime "
                          f"must decode exactly as torch does")
    if not result["max_abs_diff"] <= tol["max_abs_diff"]:      # also catches NaN
        raise ExportError(f"runtime {label}: logits differ from torch with the deployed weights by "
                          f"{result['max_abs_diff']:.3g} (tolerance {tol['max_abs_diff']:g})")
    if result["top1_agreement"] < tol["top1_agreement"]:
        raise ExportError(f"runtime {label}: top-1 agreement with torch is "
                          f"{result['top1_agreement']:.3f} (needs {tol['top1_agreement']:g})")
    log.info("runtime %s: max |logit diff| %.3g, top-1 %.3f, greedy match %s", label,
             result["max_abs_diff"], result["top1_agreement"], result["greedy_match"])


def deployment_kl(stage, deployed, tokenizer, texts, max_tokens: int | None = None) -> dict:
    """``{"kl", "top1_agreement", "ppl_ratio"}`` of the deployed model against the stage as compressed
    (KL(stage || deployed), nats per position, on ``texts``; ``bench.quality`` semantics)."""
    from edgebuild.bench import quality

    kwargs = {} if max_tokens is None else {"max_tokens": max_tokens}
    ref = quality.reference_logprobs(stage, tokenizer, texts, **kwargs)
    return quality.compare(deployed, tokenizer, texts, ref, **kwargs)
