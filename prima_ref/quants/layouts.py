"""Byte layouts of GGML quantization blocks, written as sums of their fields.

One place for every block size: kernels derive offsets from these, never from literals.
Field order is the on-disk order (ggml-common.h).
"""

from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T

QK_LEGACY = 32  # weights per block, legacy quants and IQ4_NL
QK_K = 256  # weights per super-block, K-quants and IQ1


@dataclass(frozen=True)
class Layout:
    block_size: int  # weights per block
    type_size: int  # bytes per block


LAYOUTS: dict[T, Layout] = {
    T.F32: Layout(1, 4),
    T.F16: Layout(1, 2),
    T.BF16: Layout(1, 2),
    # d (f16) + 32 x int8
    T.Q8_0: Layout(QK_LEGACY, 2 + QK_LEGACY),
    # d (f16) + 32 x 4-bit
    T.Q4_0: Layout(QK_LEGACY, 2 + QK_LEGACY // 2),
    # d, m (f16) + 32 x 4-bit
    T.Q4_1: Layout(QK_LEGACY, 2 + 2 + QK_LEGACY // 2),
    # d (f16) + 32 high bits + 32 x 4-bit
    T.Q5_0: Layout(QK_LEGACY, 2 + 4 + QK_LEGACY // 2),
    # d, m (f16) + 32 high bits + 32 x 4-bit
    T.Q5_1: Layout(QK_LEGACY, 2 + 2 + 4 + QK_LEGACY // 2),
    # d (f16) + 32 x 4-bit index into the non-linear table
    T.IQ4_NL: Layout(QK_LEGACY, 2 + QK_LEGACY // 2),
    # scales (16 x 4+4 bit) + 256 x 2-bit + d, dmin (f16)
    T.Q2_K: Layout(QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
    # hmask (256 bits) + 256 x 2-bit + 12 bytes of 6-bit scales + d (f16)
    T.Q3_K: Layout(QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    # d, dmin (f16) + 12 bytes of 6-bit scales/mins + 256 x 4-bit
    T.Q4_K: Layout(QK_K, 2 + 2 + 12 + QK_K // 2),
    # d, dmin (f16) + 12 bytes scales/mins + 256 high bits + 256 x 4-bit
    T.Q5_K: Layout(QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    # 256 x low 4-bit + 256 x high 2-bit + 16 x int8 scales + d (f16)
    T.Q6_K: Layout(QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    # d (f16) + 32 x 8-bit grid index low bits + 8 x u16 (3-bit scale, 3 high index bits x4, sign)
    T.IQ1_S: Layout(QK_K, 2 + QK_K // 8 + QK_K // 16),
    # 32 x 8-bit grid index low bits + 16 bytes of high bits/deltas + 8 bytes of scales
    T.IQ1_M: Layout(QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),
}

SUPPORTED = tuple(LAYOUTS)


def _check_against_gguf() -> None:
    for qtype, layout in LAYOUTS.items():
        expected = GGML_QUANT_SIZES[qtype]
        if (layout.block_size, layout.type_size) != expected:
            raise RuntimeError(f"layout of {qtype.name} {layout} disagrees with gguf's {expected}")


_check_against_gguf()


def row_bytes(qtype: T, n_cols: int) -> int:
    layout = LAYOUTS[qtype]
    if n_cols % layout.block_size:
        raise ValueError(f"{qtype.name} rows need a multiple of {layout.block_size} weights, got {n_cols}")
    return n_cols // layout.block_size * layout.type_size


def n_cols(qtype: T, n_row_bytes: int) -> int:
    layout = LAYOUTS[qtype]
    if n_row_bytes % layout.type_size:
        raise ValueError(f"{qtype.name} rows need a multiple of {layout.type_size} bytes, got {n_row_bytes}")
    return n_row_bytes // layout.type_size * layout.block_size
