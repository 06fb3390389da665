"""Numba code-generation settings, applied before numba compiles anything.

Measured in shared/KERNELS.md: with the straight-line (SLP) vectorizer on and the loop
vectorizer off, per-lane accumulator kernels compile to packed 512-bit int8->f32 FMAs; stock
settings unroll the block loop and fall back to gathers (3-6 GB/s instead of ~19).
The flags are process-wide, so they are set here, once, unless the user set them. If numba was
imported first, its config object is patched instead (codegen reads it at first compile).
Numba's on-disk cache does not key on these flags (nor on PRIMA_VNNI_ONLY=1,
which turns off two instruction sets in quants/tiled.py), so the cache directory does. Nor does it
notice when a function that a cached kernel inlines from another module changes (the kernels
inline helpers across prima_ref/quants and prima_ref/model/ops.py), so the directory also
carries a digest of those sources: an edited helper can never run as its stale cached copy.
"""

import hashlib
import os
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_KERNEL_SOURCES = ("quants/*.py", "model/ops.py", "model/config.py")


def _sources_digest() -> str:
    digest = hashlib.sha1()
    for pattern in _KERNEL_SOURCES:
        for path in sorted(_PACKAGE.glob(pattern)):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


_FLAGS = {"NUMBA_SLP_VECTORIZE": "1", "NUMBA_LOOP_VECTORIZE": "0"}


def _cache_dir() -> str:
    tag = "slp{}-loop{}".format(os.environ["NUMBA_SLP_VECTORIZE"], os.environ["NUMBA_LOOP_VECTORIZE"])
    if os.environ.get("PRIMA_VNNI_ONLY") == "1":  # a codegen switch too (quants/tiled.py)
        tag += "-vnni-only"
    root = os.environ.get("PRIMA_REF_CACHE") or Path.home() / ".cache" / "prima-ref"
    return str(Path(root) / "numba" / tag / _sources_digest())


def apply() -> None:
    for key, value in _FLAGS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("NUMBA_CACHE_DIR", _cache_dir())
    numba = sys.modules.get("numba")
    if numba is not None:
        config = sys.modules["numba.core.config"]
        config.SLP_VECTORIZE = int(os.environ["NUMBA_SLP_VECTORIZE"])
        config.LOOP_VECTORIZE = int(os.environ["NUMBA_LOOP_VECTORIZE"])
        config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]


apply()
