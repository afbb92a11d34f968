"""The exporter plug-in interface."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from edgebuild.core.errors import EdgebuildError, ExitCode


class ExportError(EdgebuildError):
    """The model cannot be exported, or the exported graph disagrees with the torch model."""

    exit_code = ExitCode.MODEL


class Exporter(ABC):
    """Writes a weight-free graph once per model; every stage binds its own weights to it."""

    name: ClassVar[str]

    @abstractmethod
    def export(self, model, tokenizer, out_dir) -> dict:
        """Export ``model`` (a float32 torch causal LM) into the directory ``out_dir``.

        Writes the graph without weight data plus ``graph.json``, whose content is returned: I/O
        names, cache geometry, vocabulary size and ``weights`` (graph initializer name ->
        ``{"source": state-dict name, "transpose": bool, "dtype": str, "shape": list}``).
        """

    @abstractmethod
    def verify(self, out_dir, state: dict, model, tokenizer, prompts=None) -> dict:
        """Check the graph in ``out_dir``, loaded with the numpy weights ``state``, against ``model``.

        ``model`` must carry the same weights as ``state``. Compares logits of the prefill and of a
        few KV-cached greedy decode steps on ``prompts`` (strings or token-id lists; fixed defaults
        when None). Returns ``{"max_abs_diff", "tolerance", "greedy_match", "prompts"}``; raises
        ``ExportError`` when the difference exceeds the tolerance.
        """
