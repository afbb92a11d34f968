"""What a runtime plan needs from the device's onnxruntime, and the explicit fallback when it lacks it.

    plan, notes = plan_for_device(target.runtime, ort_version="1.21.0", kernels=None)

``plan_requirements(plan)`` lists every operator a runtime of that plan uses beyond the standard
ONNX ones, each with the first onnxruntime release whose CPU kernel runs it as used.
``check_plan`` raises a one-line ``TargetError`` naming the first operator the device lacks and
the onnxruntime it needs. ``plan_for_device`` falls back, tensor class by tensor class, to the
spec's ``fallback_encoding`` when (and only when) the spec names one, and says what it changed;
it never falls back silently and never to an encoding the spec did not name.
"""
from __future__ import annotations

from dataclasses import replace

from edgebuild.core.errors import TargetError
from edgebuild.device_agent import operators
from edgebuild.export.encodings import TENSOR_CLASSES, RuntimePlan, plan_from_spec

MS = "com.microsoft"
# The fused operators of onnxruntime-genai's decoder layout, whatever the weights' encoding.
BASE = (
    {"domain": MS, "op": "GroupQueryAttention", "types": {"T": "tensor(float)"},
     "min_onnxruntime": "1.18", "why": "the fused attention with rotary embedding and KV cache"},
    {"domain": MS, "op": "SkipSimplifiedLayerNormalization", "types": {"T": "tensor(float)"},
     "min_onnxruntime": "1.17", "why": "the fused residual + RMS normalisation"},
    {"domain": "", "op": "SimplifiedLayerNormalization", "types": {"T": "tensor(float)"},
     "min_onnxruntime": "1.17", "why": "the RMS normalisation"},
)


def plan_requirements(plan: RuntimePlan) -> list:
    """Every non-standard operator a runtime of ``plan`` uses, without duplicates."""
    out, seen = [], set()
    for req in [*BASE, *(r for c in TENSOR_CLASSES for r in plan.encoding(c).requirements(c))]:
        key = (req["domain"], req["op"], tuple(sorted(req.get("types", {}).items())))
        if key in seen:
            continue
        seen.add(key)
        out.append(dict(req))
    return out


def check_plan(plan: RuntimePlan, ort_version=None, kernels=None) -> None:
    """Raise ``TargetError`` (one line) when onnxruntime ``ort_version`` with ``kernels`` cannot run ``plan``."""
    missed = operators.missing(plan_requirements(plan), ort_version, kernels)
    if missed:
        raise TargetError(f"{operators.message(missed, ort_version)} for runtime {plan.label()}",
                          hint="upgrade onnxruntime on the device, or set runtime.fallback_encoding "
                               "in the target spec")


def _class_fails(plan: RuntimePlan, tensor_class: str, ort_version, kernels) -> list:
    reqs = plan.encoding(tensor_class).requirements(tensor_class)
    return operators.missing(reqs, ort_version, kernels)


def plan_for_device(runtime, ort_version=None, kernels=None) -> tuple:
    """``(plan, notes)`` for a target spec's ``[runtime]`` on a device with ``ort_version`` and
    ``kernels`` (either may be None: unknown). A tensor class whose encoding the device cannot run
    takes ``runtime.fallback_encoding`` when the spec sets one (each change is a line in ``notes``);
    otherwise, or when the fallback cannot run either, ``TargetError``."""
    plan, notes = plan_from_spec(runtime), []
    fallback = getattr(runtime, "fallback_encoding", None)
    for tensor_class in TENSOR_CLASSES:
        missed = _class_fails(plan, tensor_class, ort_version, kernels)
        if not missed or not fallback or getattr(plan, tensor_class) == fallback:
            continue
        notes.append(f"{tensor_class}: {getattr(plan, tensor_class)} -> {fallback} "
                     f"({operators.message(missed, ort_version)})")
        plan = replace(plan, **{tensor_class: fallback}).validate()
    check_plan(plan, ort_version, kernels)
    return plan, notes
