"""Compression methods (registry ``methods``) and the packing of a whole model into records."""
from __future__ import annotations

from edgebuild.core.errors import ConfigError
from edgebuild.core.registry import Registry
from edgebuild.compress.base import CompressContext, CompressionMethod
from edgebuild.compress.packing import (
    apply_records, method_info, pack_leftovers, pack_model, packed_stats, select_linear_weights,
)

methods = Registry("compression method", error=ConfigError)
methods.register_lazy("rtn", "edgebuild.compress.rtn:RTN")
methods.register_lazy("seedlm", "edgebuild.compress.seedlm:SeedLM")
methods.register_lazy("vptq", "edgebuild.compress.vptq:VPTQ")
methods.register_lazy("hyper", "edgebuild.compress.hyper:HyperCompression")

__all__ = [
    "CompressContext", "CompressionMethod", "methods", "select_linear_weights", "pack_model",
    "apply_records", "packed_stats", "method_info", "pack_leftovers",
]
