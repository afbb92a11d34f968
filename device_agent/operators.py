"""Which operators a runtime graph needs, and whether an onnxruntime has them.

A requirement is a dict ``{"domain", "op", "types", "min_onnxruntime", "why"}``: the operator
(``domain`` "" is the ONNX domain), the type constraints the graph binds (``{"T1": "tensor(uint8)"}``,
possibly empty), the first onnxruntime release whose CPU kernel runs the graph's use of it, and
what needs it. ``missing`` compares requirements with an onnxruntime version and, when known, its
registered CPU kernels (``registered_kernels``): a kernel that is not registered, or a version
older than the minimum (attributes such as ``bits=8`` are not visible in the kernel registry),
makes a requirement missing. Standard library only, except ``registered_kernels``.
"""
from __future__ import annotations

import re

CPU = "CPUExecutionProvider"
_DOMAINS = ("com.microsoft", "")


def parse_version(text) -> tuple:
    """``(major, minor, patch)`` of a version string such as ``"1.22.1"`` or ``"1.23.0.dev2025"``."""
    numbers = [int(n) for n in re.findall(r"\d+", str(text).split("+")[0])[:3]]
    if not numbers:
        raise ValueError(f"{text!r} is not a version number")
    return tuple(numbers + [0] * (3 - len(numbers)))


def registered_kernels(domains=_DOMAINS) -> list:
    """This onnxruntime's CPU kernels in ``domains``: ``[{"domain", "op", "types": {name: [types]}}]``."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return [{"domain": k.domain, "op": k.op_name, "types": {n: list(t) for n, t in k.type_constraints.items()}}
            for k in state.get_all_opkernel_def() if k.provider == CPU and k.domain in domains]


def _kernel_fits(kernel: dict, requirement: dict) -> bool:
    if (kernel["domain"], kernel["op"]) != (requirement["domain"], requirement["op"]):
        return False
    return all(t in kernel["types"].get(name, []) for name, t in requirement.get("types", {}).items())


def missing(requirements, ort_version=None, kernels=None) -> list:
    """The requirements an onnxruntime of ``ort_version`` with ``kernels`` does not meet, each with
    ``"reason"`` added. Either may be None (unknown); with both None nothing is missing."""
    have = parse_version(ort_version) if ort_version else None
    out = []
    for req in requirements:
        reason = None
        if kernels is not None and not any(_kernel_fits(k, req) for k in kernels):
            reason = "no CPU kernel registered" + (f" for {req['types']}" if req.get("types") else "")
        elif have is not None and have < parse_version(req["min_onnxruntime"]):
            reason = f"onnxruntime {ort_version} is older than {req['min_onnxruntime']}"
        if reason:
            out.append(dict(req, reason=reason))
    return out


def describe(requirement: dict) -> str:
    """``com.microsoft.GatherBlockQuantized`` (``ai.onnx`` for the default domain)."""
    return f"{requirement['domain'] or 'ai.onnx'}.{requirement['op']}"


def message(missed: list, ort_version=None) -> str:
    """One line naming the first missing operator, why it is needed and the onnxruntime it needs."""
    first = missed[0]
    more = f" (and {len(missed) - 1} more)" if len(missed) > 1 else ""
    newest = max((m["min_onnxruntime"] for m in missed), key=parse_version)
    have = f"onnxruntime {ort_version}" if ort_version else "this onnxruntime"
    return (f"{have} cannot run operator {describe(first)} needed by {first['why']} "
            f"({first['reason']}){more}; it needs onnxruntime >= {newest}")
