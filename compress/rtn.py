"""``rtn``: the reference method, round-to-nearest groupwise integer quantisation.

Each row of a weight is cut into groups of ``group_size`` input columns; every group gets its own
fp16 scale (and, unless symmetric, an fp16 zero: the value of code 0). Codes are bit-packed tightly,
so a ``bits``-bit code costs ``bits`` bits. The record layout is described in
``edgebuild.device_agent.codecs.rtn``, whose decoder turns records back into weights.

The fp16 scale is rounded up and the fp16 zero down, so every weight lies inside its group's grid
and the rounding error is at most half a scale.
"""
from __future__ import annotations

from typing import ClassVar

import logging
from dataclasses import dataclass

from edgebuild.core.errors import ConfigError, ModelError
from edgebuild.compress.base import CompressContext, CompressionMethod
from edgebuild.device_agent.codecs.rtn import pack_bits
from edgebuild.device_agent.packed import Record

log = logging.getLogger(__name__)

MIN_GROUP = 32     # recommend() halves group_size down to this, then adds bits
MAX_BITS = 8


@dataclass
class RTNConfig:
    """Knobs of ``rtn``: bits per code, input columns per group (-1: one group per row), symmetry."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the knob and its allowed values when one is out of range."""
        if not _is_int(self.bits) or not 2 <= self.bits <= MAX_BITS:
            raise ConfigError(f"rtn knob 'bits' = {self.bits!r} is not allowed "
                              f"(allowed: an integer from 2 to {MAX_BITS})")
        group = self.group_size
        if not _is_int(group) or not (group == -1 or (group >= 8 and group & (group - 1) == 0)):
            raise ConfigError(f"rtn knob 'group_size' = {group!r} is not allowed "
                              "(allowed: a power of two >= 8, or -1 for one group per row)")
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"rtn knob 'symmetric' = {self.symmetric!r} is not allowed "
                              "(allowed: true or false)")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class RTN(CompressionMethod):
    """Round-to-nearest groupwise integer quantisation (reference method)."""

    name = "rtn"
    config_class = RTNConfig
    reference = True
    knob_space: ClassVar[dict] = {"group_size": [128, 64, 32], "bits": [4, 5, 6, 8]}
    knob_order: ClassVar[tuple] = ("group_size", "bits")

    def compress(self, weights: dict, ctx: CompressContext) -> list[Record]:
        """Quantise each 2-D tensor of ``weights``; one ``rtn`` record per tensor, same order."""
        records = []
        for done, (name, weight) in enumerate(weights.items(), start=1):
            records.append(self.compress_one(name, weight))
            ctx.progress(done, len(weights))
        return records

    def compress_one(self, name: str, weight) -> Record:
        """Quantise one 2-D tensor to an ``rtn`` record."""
        import torch

        if weight.dim() != 2:
            raise ModelError(f"rtn quantises 2-D weights only; {name!r} has shape {tuple(weight.shape)}")
        weight = weight.detach().float()
        if not bool(torch.isfinite(weight).all()):
            raise ModelError(f"weight {name!r} holds NaN or infinite values; check the source model")
        cfg = self.config
        group = weight.shape[1] if cfg.group_size == -1 else cfg.group_size
        codes, scales, zeros = quantize(weight, cfg.bits, group, cfg.symmetric)
        if not bool(torch.isfinite(scales).all()):
            raise ModelError(f"weight {name!r} has values too large for fp16 scales")
        arrays = {"codes": pack_bits(codes.cpu().numpy(), cfg.bits), "scales": scales.cpu().numpy()}
        if zeros is not None:
            arrays["zeros"] = zeros.cpu().numpy()
        params = {"bits": cfg.bits, "group_size": group, "symmetric": cfg.symmetric}
        log.debug("rtn %s %s: %d bits, group %d", name, tuple(weight.shape), cfg.bits, group)
        return Record(name, tuple(weight.shape), self.name, params, arrays)


def quantize(weight, bits: int, group: int, symmetric: bool):
    """Quantise a float32 ``(rows, cols)`` tensor in groups of ``group`` columns.

    Returns ``(codes, scales, zeros)``: uint8 codes ``(rows, cols)``, fp16 scales and zeros
    ``(rows, groups)``; ``zeros`` is ``None`` when symmetric.
    """
    import torch

    rows, cols = weight.shape
    groups = -(-cols // group)
    pad = groups * group - cols
    if pad:   # repeat the last column: the partial group's range stays its own
        weight = torch.cat([weight, weight[:, -1:].expand(rows, pad)], dim=1)
    x = weight.reshape(rows, groups, group)
    codes, scales, zeros = _symmetric(x, bits) if symmetric else _asymmetric(x, bits)
    codes = codes.reshape(rows, groups * group)[:, :cols].to(torch.uint8)
    return codes.contiguous(), scales, zeros


def _asymmetric(x, bits):
    top = (1 << bits) - 1
    zeros = _fp16_toward(x.amin(dim=-1), up=False)
    spans = x.amax(dim=-1) - zeros.float()
    scales = _fp16_toward(spans / top, up=True)
    codes = ((x - zeros.float()[..., None]) / _nonzero(scales)[..., None]).round().clamp(0, top)
    return codes, scales, zeros


def _symmetric(x, bits):
    half = 1 << (bits - 1)
    scales = _fp16_toward(x.abs().amax(dim=-1) / (half - 1), up=True)
    codes = (x / _nonzero(scales)[..., None]).round().clamp(1 - half, half - 1) + half
    return codes, scales, None


def _fp16_toward(values, up: bool):
    """Round float32 ``values`` to fp16, toward +inf when ``up`` else toward -inf."""
    import torch

    half = values.half()
    wrong = half.float() < values if up else half.float() > values
    target = torch.full_like(half, float("inf") if up else float("-inf"))
    return torch.where(wrong, torch.nextafter(half, target), half)


def _nonzero(scales):
    """Scales as float32 with zeros replaced by 1 (a constant group: every code is 0 or mid)."""
    import torch

    scales = scales.float()
    return torch.where(scales > 0, scales, torch.ones_like(scales))
