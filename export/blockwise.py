"""The built-in runtime encodings: ``fp32``, and blockwise ``int8`` / ``int4``.

The blockwise encodings quantise with onnxruntime's own tooling: linear layers through
``MatMulNBitsQuantizer`` (round to nearest, per block along the input dimension), the embedding
and the output head through the same quantiser's block kernel (``DefaultWeightOnlyQuantizer``),
laid out as onnxruntime-genai lays out a tied embedding: one packed ``uint8`` tensor read by the
head's ``MatMulNBits`` and, through a ``Reshape``, by the embedding's ``GatherBlockQuantized``.
"""
from __future__ import annotations

import logging

import numpy as np

from edgebuild.export import onnx_edit
from edgebuild.export.base import ExportError
from edgebuild.export.encodings import BLOCK_SIZES, Encoding

log = logging.getLogger(__name__)

MS = "com.microsoft"
_QUANTIZER_LOG = "onnxruntime.quantization.matmul_nbits_quantizer"


def embedding_block_size(hidden: int, block_size: int) -> int:
    """The block size the embedding uses: ``block_size`` when it divides ``hidden``, else the
    largest smaller supported one that does (a shared head/embedding tensor cannot pad rows)."""
    for size in sorted((b for b in BLOCK_SIZES if b <= block_size), reverse=True):
        if hidden % size == 0:
            return size
    raise ExportError(f"the embedding width {hidden} is not a multiple of any block size up to "
                      f"{block_size} ({', '.join(map(str, BLOCK_SIZES))}); use the fp32 embedding encoding")


class Float32(Encoding):
    """float32 weights: the graph as the builder wrote it."""

    name = "fp32"

    def linear(self, model, nodes: list) -> None:
        """Nothing to do: the float graph already holds float32 weights."""

    def embedding(self, model, gather: str, head: str | None) -> None:
        """Nothing to do: the float graph already holds a float32 embedding (shared with a tied head)."""

    def requirements(self, tensor_class: str) -> list:
        """Standard ``MatMul``/``Gather`` only: nothing beyond the base graph."""
        return []


class Blockwise(Encoding):
    """``bits``-bit blockwise integers: MatMulNBits for linear layers, GatherBlockQuantized for the embedding."""

    def _config(self, block_size: int):
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

        return DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=self.knobs.symmetric,
                                            accuracy_level=self.knobs.accuracy_level or None,
                                            bits=self.bits, op_types_to_quantize=("MatMul",))

    def linear(self, model, nodes: list) -> None:
        """Replace each named ``MatMul`` by ``MatMulNBits`` (onnxruntime's ``MatMulNBitsQuantizer``)."""
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        wanted = set(nodes)
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in wanted]
        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=others,
                                         algo_config=self._config(self.knobs.block_size))
        with onnx_edit.quiet(_QUANTIZER_LOG):
            quantizer.process()
        left = wanted & {n.name for n in model.graph.node if n.op_type == "MatMul"}
        if left:
            raise ExportError(f"onnxruntime's quantiser left {sorted(left)[:2]} in float; their "
                              f"weights are not constant 2-D initializers")

    def embedding(self, model, gather: str, head: str | None) -> None:
        """Quantise the embedding once; a tied head's ``MatMulNBits`` reads the same packed tensor."""
        table, tied = onnx_edit.embedding_table(model, gather, head)
        block = embedding_block_size(table.shape[1], self.knobs.block_size)
        base = f"{gather.strip('/').replace('/', '.')}.weight"
        packed, scales, zeros = self._quantize(table, block)
        names = self._store(model, base, packed, scales, zeros)
        data = onnx_edit.reshape_initializer(model, names[0], [table.shape[0], -1], f"{base}.rows")
        onnx_edit.replace_gather(model, gather, data, names[1:], bits=self.bits, block_size=block)
        if head is not None and tied:
            onnx_edit.replace_matmul(model, head, names, K=table.shape[1], N=table.shape[0],
                                     bits=self.bits, block_size=block,
                                     accuracy_level=self.knobs.accuracy_level)
        elif head is not None:
            self.linear(model, [head])
        onnx_edit.drop_unused(model)

    def _quantize(self, table: np.ndarray, block: int) -> tuple:
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

        weight = np.ascontiguousarray(table.T, dtype=np.float32)          # [K, N] as MatMul reads it
        packed, scales, zeros = DefaultWeightOnlyQuantizer(self._config(block)).qbits_block_quant(weight)
        return packed, scales, None if self.knobs.symmetric else zeros

    def _store(self, model, base: str, packed, scales, zeros) -> list:
        names = [f"{base}_Q{self.bits}", f"{base}_scales"]
        arrays = [packed, scales]
        if zeros is not None:
            names.append(f"{base}_zero_points")
            arrays.append(zeros)
        for name, array in zip(names, arrays):
            onnx_edit.add_initializer(model, name, array)
        return names

    def requirements(self, tensor_class: str) -> list:
        """MatMulNBits for ``linear``; GatherBlockQuantized (uint8 data) and MatMulNBits for ``embedding``."""
        what = f"the {self.name} {tensor_class} encoding"
        matmul = {"domain": MS, "op": "MatMulNBits", "types": {"T1": "tensor(float)", "T2": "tensor(uint8)"},
                  "min_onnxruntime": "1.17" if self.bits == 4 else "1.22", "why": what}
        if tensor_class == "linear":
            return [matmul]
        basic = self.bits == 4 and self.knobs.symmetric     # no zero points, 4 bits
        gather = {"domain": MS, "op": "GatherBlockQuantized", "types": {"T1": "tensor(uint8)"},
                  "min_onnxruntime": "1.22" if basic else "1.23",
                  "why": what + ("" if basic else f" ({self.bits}-bit uint8 data with zero points)")}
        return [gather, matmul]


class Int8(Blockwise):
    """8-bit blockwise integers."""

    name = "int8"
    bits = 8


class Int4(Blockwise):
    """4-bit blockwise integers."""

    name = "int4"
    bits = 4
