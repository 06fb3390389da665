"""Numba code-generation settings, applied before numba is first imported.

Measured in shared/KERNELS.md: with the straight-line (SLP) vectorizer on and the loop
vectorizer off, per-lane accumulator kernels compile to packed 512-bit int8->f32 FMAs; stock
settings unroll the block loop and fall back to gathers (3-6 GB/s instead of ~19).
The flags are process-wide, so they are set here, once, and only if the user has not set them.
"""

import os
import sys

_FLAGS = {"NUMBA_SLP_VECTORIZE": "1", "NUMBA_LOOP_VECTORIZE": "0"}


def apply() -> None:
    if "numba" in sys.modules:
        # Too late to change codegen; kernels still work, only slower.
        return
    for key, value in _FLAGS.items():
        os.environ.setdefault(key, value)


apply()
