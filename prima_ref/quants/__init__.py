"""Quantized tensor kernels, one module per family, each with a numpy reference beside it.

Every family module exports ``KERNELS: dict[GGMLQuantizationType, QuantKernels]``.
The contract, shared by all types:

- ``raw``: uint8 array of shape (n_rows, row_bytes), C-contiguous; usually a read-only
  zero-copy view of the mmapped GGUF file. ``n_cols = row_bytes // type_size * block_size``.
- ``dequantize_ref(raw) -> float32 (n_rows, n_cols)``: plain numpy, the readable reference.
- ``dequantize(raw) -> float32 (n_rows, n_cols)``: Numba; bit-equal to gguf.quants.dequantize.
- ``matvec(raw, x) -> float32 (n_rows,)``: y = W @ x for x float32 (n_cols,); decode.
- ``matmul(raw, xs) -> float32 (n_tokens, n_rows)``: ys = xs @ W.T for xs float32
  (n_tokens, n_cols); prefill. Neither ever dequantizes the whole matrix.

Both products are parallel over output rows; ``set_num_threads`` sets the thread count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

import numpy as np
from gguf.constants import GGMLQuantizationType

from prima_ref.quants.layouts import LAYOUTS, n_cols

_FAMILIES = ("float_types", "legacy", "k_quants", "iq_quants")


@dataclass(frozen=True)
class QuantKernels:
    dequantize_ref: Callable[[np.ndarray], np.ndarray]
    dequantize: Callable[[np.ndarray], np.ndarray]
    matvec: Callable[[np.ndarray, np.ndarray], np.ndarray]
    matmul: Callable[[np.ndarray, np.ndarray], np.ndarray]
    x_quantized: bool = False  # True when the products quantize x (error bound 5e-4, else 1e-6)


_REGISTRY: dict[GGMLQuantizationType, QuantKernels] | None = None


def registry() -> dict[GGMLQuantizationType, QuantKernels]:
    global _REGISTRY
    if _REGISTRY is None:
        reg: dict[GGMLQuantizationType, QuantKernels] = {}
        for family in _FAMILIES:
            reg.update(import_module(f"prima_ref.quants.{family}").KERNELS)
        _REGISTRY = reg
    return _REGISTRY


class UnsupportedQuantType(ValueError):
    pass


def kernels(qtype: GGMLQuantizationType | int) -> QuantKernels:
    qtype = GGMLQuantizationType(qtype)
    try:
        return registry()[qtype]
    except KeyError:
        supported = ", ".join(t.name for t in LAYOUTS)
        raise UnsupportedQuantType(
            f"tensor type {qtype.name} is not supported by prima-ref (supported: {supported})"
        ) from None


def as_rows(raw: np.ndarray, qtype: GGMLQuantizationType, n_rows: int) -> np.ndarray:
    """View flat tensor bytes as (n_rows, row_bytes) without copying."""
    flat = raw.reshape(-1).view(np.uint8)
    if flat.size % n_rows:
        raise ValueError(f"{flat.size} bytes do not split into {n_rows} rows of {qtype.name}")
    rows = flat.reshape(n_rows, flat.size // n_rows)
    n_cols(qtype, rows.shape[1])  # validates the row length
    return rows


def set_num_threads(n: int) -> None:
    import numba

    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def dequantize(raw: np.ndarray, qtype) -> np.ndarray:
    return kernels(qtype).dequantize(raw)


def matvec(raw: np.ndarray, qtype, x: np.ndarray) -> np.ndarray:
    return kernels(qtype).matvec(raw, x)


def matmul(raw: np.ndarray, qtype, xs: np.ndarray) -> np.ndarray:
    return kernels(qtype).matmul(raw, xs)
