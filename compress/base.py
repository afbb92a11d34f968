"""The compression-method plug-in interface."""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from edgebuild.device_agent.packed import Record


@dataclass
class CompressContext:
    """What a method may use besides the tensors themselves."""

    model: Any = None                      # torch model being compressed (for calibration)
    tokenizer: Any = None
    calibration_texts: list = field(default_factory=list)
    device: str = "cpu"                    # "cuda" when a GPU is present
    seed: int = 0
    progress: Callable[[int, int], None] = lambda done, total: None
    log: dict = field(default_factory=dict)  # facts the method records (e.g. seed budget used)


class CompressionMethod(ABC):
    """A weight-compression method: knobs in ``config_class``, records out of ``compress``."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    reference: ClassVar[bool] = False
    # What an accuracy-aware search may try (``edgebuild.compress.search``): knob -> values from
    # most compressed to least, and which knob moves first. A build config may replace both.
    knob_space: ClassVar[dict] = {}
    knob_order: ClassVar[tuple] = ()

    def __init__(self, config=None):
        self.config = config if config is not None else self.config_class()

    @classmethod
    def from_knobs(cls, knobs: dict) -> "CompressionMethod":
        """Build from a dict of knob values; unknown knobs raise ``KeyError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(knobs) - names)
        if unknown:
            raise KeyError(f"unknown knob(s) {unknown} for method {cls.name!r} (known: {sorted(names)})")
        return cls(cls.config_class(**knobs))

    def knobs(self) -> dict:
        return dataclasses.asdict(self.config)

    @abstractmethod
    def compress(self, weights: dict, ctx: CompressContext) -> list[Record]:
        """Compress each 2-D float tensor in ``weights`` (name -> torch.Tensor).

        Returns one ``Record`` per tensor, with the same names, whose ``codec`` is ``self.name``
        and which ``edgebuild.device_agent.codecs.decode`` turns back into a float32 array.
        """

