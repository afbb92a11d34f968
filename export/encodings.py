"""Runtime encodings: how each class of tensor is stored and executed on the device.

``encodings.get("int4")`` returns an ``Encoding`` class; an instance rewrites the float ONNX graph
(onnxruntime-genai's layout, see ``edgebuild.export.runtime_graph``) so that the device runs the
tensors of one class in that encoding, without expanding them to float:

* ``fp32``: float32 initializers (``MatMul``, ``Gather``): the baseline.
* ``int8`` / ``int4``: blockwise integers along the input dimension (``block_size`` values share
  one float32 scale and, unless ``symmetric``, one integer zero point). Linear layers become
  ``com.microsoft.MatMulNBits`` (``accuracy_level`` 4 lets CPUs with int8 dot products quantise
  the activations and run int8 kernels); the embedding becomes ``GatherBlockQuantized``, reading
  the same packed tensor as the tied output head's ``MatMulNBits``.

A ``RuntimePlan`` picks one encoding per tensor class (``linear``: every projection of the decoder
layers; ``embedding``: the token embedding and, tied or not, the output head) plus the knobs.
Entries are lazy: importing this module pulls in neither onnx nor onnxruntime.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from edgebuild.core.errors import ConfigError
from edgebuild.core.registry import Registry

TENSOR_CLASSES = ("linear", "embedding")
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)

encodings: Registry = Registry("runtime encoding", error=ConfigError)
encodings.register_lazy("fp32", "edgebuild.export.blockwise:Float32")
encodings.register_lazy("int8", "edgebuild.export.blockwise:Int8")
encodings.register_lazy("int4", "edgebuild.export.blockwise:Int4")


@dataclass(frozen=True)
class Knobs:
    """Settings shared by the blockwise encodings of one runtime."""

    block_size: int = 32
    accuracy_level: int = 4      # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
    # True: no zero points (codes centred on 2**(bits-1)). MatMulNBits zero points are integers, so an
    # asymmetric block's range always contains 0; measured on SmolLM2-135M, int4 g32 symmetric is as
    # close to the model (KL 0.46 vs 0.47), smaller and faster, and needs an older onnxruntime.
    symmetric: bool = True

    def validate(self) -> "Knobs":
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"runtime block_size {self.block_size} is not supported; use one of "
                              f"{', '.join(map(str, BLOCK_SIZES))}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ConfigError(f"runtime accuracy_level {self.accuracy_level} is not one of "
                              f"{', '.join(map(str, ACCURACY_LEVELS))}")
        return self


class Encoding(ABC):
    """Stores one tensor class in one runtime format by rewriting an ONNX graph in place."""

    name: ClassVar[str]
    bits: ClassVar[int | None] = None          # None: float

    def __init__(self, knobs: Knobs | None = None):
        self.knobs = (knobs or Knobs()).validate()

    @abstractmethod
    def linear(self, model, nodes: list) -> None:
        """Rewrite the ``MatMul`` nodes named ``nodes`` of ``model`` (an ``onnx.ModelProto`` whose
        weights are float initializers of shape [K, N]) so their weights run in this encoding."""

    @abstractmethod
    def embedding(self, model, gather: str, head: str | None) -> None:
        """Rewrite the token embedding ``Gather`` node ``gather`` (and the output head ``MatMul``
        node ``head``, None when the graph has no separate one) of ``model`` into this encoding;
        when the head is tied to the embedding, both read one stored tensor."""

    @abstractmethod
    def requirements(self, tensor_class: str) -> list:
        """The operators this encoding needs for ``tensor_class`` ("linear" or "embedding"), as
        ``edgebuild.device_agent.operators`` requirements (domain, op, types, min_onnxruntime, why)."""


@dataclass(frozen=True)
class RuntimePlan:
    """The encoding of each tensor class, and the knobs, of one runtime directory."""

    linear: str = "int4"
    embedding: str = "int4"
    knobs: Knobs = field(default_factory=Knobs)

    def validate(self) -> "RuntimePlan":
        for tensor_class in TENSOR_CLASSES:
            encodings.get(getattr(self, tensor_class))   # a ConfigError naming the known ones
        self.knobs.validate()
        return self

    def encoding(self, tensor_class: str) -> Encoding:
        return encodings.get(getattr(self, tensor_class))(self.knobs)

    def label(self) -> str:
        """``int4-g32-asym`` (linear), with ``/emb=int8`` when the embedding differs."""
        base = _label(self.linear, self.knobs)
        return base if self.embedding == self.linear else f"{base}/emb={self.embedding}"

    def to_dict(self) -> dict:
        return {"encodings": {c: getattr(self, c) for c in TENSOR_CLASSES}, "knobs": asdict(self.knobs)}

    @classmethod
    def from_dict(cls, data: dict) -> "RuntimePlan":
        return cls(**data["encodings"], knobs=Knobs(**data["knobs"]))


def _label(name: str, knobs: Knobs) -> str:
    if name == "fp32":
        return name
    return f"{name}-g{knobs.block_size}-{'sym' if knobs.symmetric else 'asym'}"


def plan_from_spec(runtime) -> RuntimePlan:
    """The ``RuntimePlan`` of a target spec's ``[runtime]`` table (``edgebuild.targets.spec.RuntimeSpec``)."""
    knobs = Knobs(block_size=runtime.block_size, accuracy_level=runtime.accuracy_level,
                  symmetric=runtime.symmetric)
    return RuntimePlan(linear=runtime.encoding, embedding=runtime.embedding_encoding or runtime.encoding,
                       knobs=knobs).validate()
