"""prima-ref: distributed GGUF inference on home devices (a Python re-implementation of prima.cpp)."""

from prima_ref import _numba_env  # noqa: F401  (must run before numba is imported)

__version__ = "0.1.0"
