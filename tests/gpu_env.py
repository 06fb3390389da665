"""Chooses numba.cuda's target for the GPU tests before numba.cuda is first imported: the real
device when the CUDA driver sees one (or PRIMA_GPU_TESTS=device), else numba's CUDA simulator
(NUMBA_ENABLE_CUDASIM=1 while numba.cuda loads), which runs the kernels' indexing and
arithmetic on the CPU."""

import ctypes
import os
import sys


def cuda_device_present() -> bool:
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            cu = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int()
        if cu.cuInit(0) != 0 or cu.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return False
        return count.value > 0
    return False


if (os.environ.get("PRIMA_GPU_TESTS") != "device" and not cuda_device_present()
        and "NUMBA_ENABLE_CUDASIM" not in os.environ):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if "numba" in sys.modules:  # an earlier test imported numba: make it read the variable again
        from numba.core import config

        config.reload_config()
    from numba import cuda  # noqa: F401  (numba.cuda picks the simulator once, here)

    del os.environ["NUMBA_ENABLE_CUDASIM"]  # child processes of later tests must not inherit it
