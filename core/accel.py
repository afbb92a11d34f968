"""Where torch runs the host's work (compression, benchmark scoring, KL): ``cpu`` or ``cuda``.

``auto`` picks ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``; asking for ``cuda``
where there is none is a one-line ``HostError``, never a silent CPU run. Scoring stays float32 on
either device: bfloat16 changes benchmark scores on the same items, so it is not used.
"""
from __future__ import annotations

from edgebuild.core.errors import ConfigError, HostError

CHOICES = ("auto", "cpu", "cuda")


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def resolve(requested: str, available=cuda_available) -> str:
    """``cpu`` or ``cuda`` for a requested ``auto``, ``cpu`` or ``cuda``."""
    if requested not in CHOICES:
        raise ConfigError(f"torch device {requested!r} is not one of {', '.join(CHOICES)}")
    if requested == "cpu":
        return "cpu"
    if available():
        return "cuda"
    if requested == "cuda":
        raise HostError("--device cuda was asked for, but torch sees no CUDA device here",
                        hint="run on a machine with an NVIDIA GPU and a CUDA build of torch, or pass --device cpu")
    return "cpu"


def describe(device: str) -> str:
    """``cpu`` or ``cuda (NVIDIA H100 80GB HBM3)``: the device a manifest and report name."""
    if device != "cuda":
        return device
    import torch
    return f"cuda ({torch.cuda.get_device_name(0)})"


class TorchDevice:
    """The device of a build, resolved when first needed (a build whose steps are all cached never
    imports torch); an explicit ``cuda`` is checked at once, so a missing GPU stops the build
    before any work."""

    def __init__(self, requested: str = "auto", available=cuda_available):
        self.requested, self._available, self._name = requested, available, None
        if requested != "auto":
            self._name = resolve(requested, available)

    @property
    def name(self) -> str:
        """``cpu`` or ``cuda``."""
        if self._name is None:
            self._name = resolve(self.requested, self._available)
        return self._name

    @property
    def resolved(self) -> str | None:
        """The device, or None when nothing needed torch yet."""
        return self._name

    def __str__(self) -> str:
        return self.name
