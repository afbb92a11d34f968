"""Exporters: turn a torch causal LM into a device graph whose weights are bound at load time.

``exporters.get("onnx")`` returns the ONNX exporter class (graph with KV cache); ``encodings``
(``edgebuild.export.encodings``) holds the runtime encodings a stage is deployed in (``fp32``,
``int8``, ``int4``; ``runtime_build.encode_stage`` writes a runtime directory). Entries are lazy,
so importing this package pulls in neither torch nor onnx.
"""
from edgebuild.core.errors import ConfigError
from edgebuild.core.registry import Registry
from edgebuild.export.base import ExportError, Exporter
from edgebuild.export.encodings import RuntimePlan, encodings

exporters = Registry("exporter", error=ConfigError)
exporters.register_lazy("onnx", "edgebuild.export.onnx_graph:OnnxExporter")

__all__ = ["ExportError", "Exporter", "RuntimePlan", "encodings", "exporters"]
