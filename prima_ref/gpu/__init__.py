"""GPU offload through numba.cuda: the last n layers of each window run wholly on a CUDA GPU.

`offload_layers` picks the layers (prima.cpp's -ngl: the last n of each window; --gpu-mem caps
the device bytes, the rest stay on the CPU) and builds a `GpuLayer` for each. Without a CUDA
device it returns no layers and says so in one [gpu] line on stderr; nothing fails.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

GIB = 1 << 30


def cuda_status() -> tuple[bool, str]:
    """(usable, why): whether numba.cuda sees a CUDA device (or its simulator is on)."""
    try:
        from numba import cuda

        if "simulator" in getattr(cuda.to_device, "__module__", ""):  # NUMBA_ENABLE_CUDASIM=1
            return True, "numba CUDA simulator"
        if not cuda.is_available():
            return False, "numba.cuda finds no CUDA driver or device"
        dev = cuda.get_current_device()
        return True, dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    except Exception as err:  # a broken driver install must not stop a CPU run
        return False, f"numba.cuda failed to start ({type(err).__name__}: {err})"


def windows_of(layer_ids: Sequence[int]) -> list[list[int]]:
    """Split sorted layer ids into maximal runs of consecutive ids (a ring rank's windows)."""
    out: list[list[int]] = []
    for il in sorted(layer_ids):
        if out and il == out[-1][-1] + 1:
            out[-1].append(il)
        else:
            out.append([il])
    return out


def choose_layers(layer_ids: Sequence[int], n_per_window: int, bytes_of: Callable[[int], int],
                  budget_bytes: int | None) -> tuple[list[int], list[int]]:
    """(on the GPU, wanted but left on the CPU for lack of memory): the last n_per_window
    layers of each window, the windows' last layers first, while their bytes fit in budget_bytes."""
    windows = windows_of(layer_ids)
    wanted = [w[-1 - depth] for depth in range(max(0, n_per_window)) for w in windows
              if depth < len(w)]  # each window's last layer, then each one's next-to-last...
    chosen, left, used = [], [], 0
    for il in wanted:
        need = bytes_of(il)
        if budget_bytes is not None and used + need > budget_bytes:
            left.append(il)
            continue
        chosen.append(il)
        used += need
    return sorted(chosen), sorted(left)


def free_bytes() -> int | None:
    try:
        from numba import cuda

        free, _total = cuda.current_context().get_memory_info()
        return int(free)
    except Exception:
        return None


def offload_layers(model, cfg, layers: dict, n_ctx: int, n_per_window: int,
                   gpu_mem_gib: float | None = None) -> dict:
    """{layer id: GpuLayer} for the chosen layers of `layers` (id -> CPU Layer); {} without
    CUDA. gpu_mem_gib None: the device's free memory less 10% is the budget."""
    if n_per_window <= 0:
        return {}
    ok, why = cuda_status()
    if not ok:
        print(f"[gpu] -ngl {n_per_window} ignored, every layer stays on the CPU: {why}",
              file=sys.stderr)
        return {}
    from prima_ref.gpu.layer import GpuLayer, layer_bytes

    if gpu_mem_gib is not None:
        budget = int(gpu_mem_gib * GIB)
    else:
        free = free_bytes()
        budget = None if free is None else int(free * 0.9)
    chosen, left = choose_layers(list(layers), n_per_window,
                                 lambda il: layer_bytes(model, cfg, il, n_ctx), budget)
    out = {il: GpuLayer(model, cfg, il, layers[il], n_ctx) for il in chosen}
    used = sum(g.nbytes for g in out.values()) / 2**20
    note = f"; {len(left)} more stay on the CPU (--gpu-mem)" if left else ""
    print(f"[gpu] {len(out)} layers on {why} ({used:.1f} MiB): {_spans(chosen)}{note}",
          file=sys.stderr)
    return out


def _spans(ids: list[int]) -> str:
    spans = [f"{w[0]}-{w[-1]}" if len(w) > 1 else str(w[0]) for w in windows_of(ids)]
    return ", ".join(spans) or "none"
