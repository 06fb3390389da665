"""The per-token latency model: what one split of the layers costs, term by term.

One source of truth: the ILP (halda.py) takes its coefficients from here, and `predict` and
`violations` evaluate any split directly (piecewise, with if-statements, no linearisation), so
the tests can check the ILP against brute force over the same model.

A split is (k, w, n): k rounds per token; device m runs w_m layers per round, the last n_m of
them on its GPU, so it holds l_m = k*w_m layers. Token latency (ms):

    T = sum_m [ k*(w_m - n_m)*cpu_m + k*n_m*gpu_m      compute, per layer: measured whole
                                                        decode steps of this model (profile
                                                        v2 cpu.decode) + attention beyond the
                                                        timed position; else max(FLOPs/GFLOPS,
                                                        bytes/matvec GB/s, bytes/RAM GB/s)
                                                        + attention over the KV cache + KV copy
              + reread_m * ms_per_gib_m                 disk: bytes re-read per token, by OS case
              + k*hop_m*[m in ring] ]                   a window's hop: network latency +
                                                        activations / bandwidth + the ring
                                                        runtime's own CPU work (profile v3
                                                        `ring`: a worker's receive, decode,
                                                        checks, send per window; rank 0's per
                                                        round)
        + fixed                                         rank 0: output layer, embedding row,
                                                        sampling

OS cases (prima.cpp's sets; "need" = mapped weights + KV + buffers that must sit in RAM):
    M4  need <= RAM budget: nothing re-read.
    M3  linux, android, windows over budget: only the overflow (need - budget) is re-read,
        sequentially on linux/android (POSIX_FADV_SEQUENTIAL), randomly on windows; android
        first swaps out `swappable_gib` of anonymous memory, so its budget includes it.
    M1  macOS without Metal over budget: every mapped weight byte is re-read (random reads).
    M2  macOS with Metal over budget: the same, GPU layers included (unified memory).
A device may leave at most `disk.free_gib` of its share on disk; GPU layers must fit in
usable VRAM (free minus the backend's reserve).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.profiles import (
    DEFAULT_QTYPE,
    DeviceProfile,
    ModelProfile,
    ProfileError,
    TensorGroup,
    Throughput,
)

GIB = float(1 << 30)

# Reserves and margins, one visible block (prima.cpp's empirical figures, digest section 1.4).
CUDA_RESERVE_GIB = 0.7  # CUDA context (~400 MiB) plus 300 MiB safety
METAL_RESERVE_GIB = 0.3  # Metal's own buffers
ANDROID_RESERVE_GIB = 0.125  # memory Android keeps for itself
ACTIVATION_HEADER_BYTES = 64  # request id, step, sequence number, positions
SAMPLING_FLOPS_PER_VOCAB = 5  # softmax and sampling over the logits
# Tie-break: keep a device unless removing it saves more than this (also keeps plans stable).
ACTIVE_BONUS_MS = 1e-3


@dataclass(frozen=True)
class Split:
    k: int
    w: tuple[int, ...]  # layers per round, per device (0 = removed, or rank 0 holding none)
    n: tuple[int, ...]  # of those, on the GPU


@dataclass(frozen=True)
class DeviceCost:
    """Everything the model needs about one device for one model and context."""

    name: str
    os: str
    gpu_backend: str  # "none", "cuda", "metal"
    cpu_layer_ms: float
    gpu_layer_ms: float  # == cpu_layer_ms without a GPU, so n_m has no effect
    hop_ms: float
    layer_gib: float  # weights of one layer
    kv_gib: float  # KV cache of one layer at the planned context
    head_gib: float  # rank 0: output layer + one embedding row, mapped; others 0
    buffers_gib: float  # compute buffers while active (+ logits on rank 0)
    ram_budget_gib: float
    disk_room_gib: float
    disk_ms_per_gib: float
    vram_budget_gib: float  # for GPU layers, after the reserve; 0 without a GPU
    is_rank0: bool

    @property
    def layer_need_gib(self) -> float:
        return self.layer_gib + self.kv_gib

    @property
    def unified(self) -> bool:
        """macOS: GPU layers live in RAM too, and an overflow re-reads everything mapped."""
        return self.os == "macos"

    @property
    def has_gpu(self) -> bool:
        return self.vram_budget_gib > 0 and self.gpu_backend != "none"


@dataclass(frozen=True)
class DeviceTerms:
    cpu_ms: float
    gpu_ms: float
    disk_ms: float
    hop_ms: float
    case: str
    ram_need_gib: float
    vram_need_gib: float
    reread_gib: float

    @property
    def total_ms(self) -> float:
        return self.cpu_ms + self.gpu_ms + self.disk_ms + self.hop_ms


@dataclass(frozen=True)
class Prediction:
    total_ms: float
    fixed_ms: float
    per_device: tuple[DeviceTerms, ...]
    terms_ms: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Coefficients


def device_costs(devices: list[DeviceProfile], model: ModelProfile, ctx: int) -> list[DeviceCost]:
    return [_device_cost(d, model, ctx, rank == 0) for rank, d in enumerate(devices)]


def _device_cost(d: DeviceProfile, model: ModelProfile, ctx: int, is_rank0: bool) -> DeviceCost:
    cpu_ms = cpu_layer_ms(d, model, ctx)
    gpu_ms, vram = cpu_ms, 0.0
    if d.gpu is not None:
        gpu_ms = _layer_ms(d, model, ctx, d.gpu.matvec, d.gpu.bandwidth_gbps, "gpu.matvec")
        gpu_ms += d.gpu.kv_copy_ms_per_layer
        reserve = CUDA_RESERVE_GIB if d.gpu.is_cuda else METAL_RESERVE_GIB
        vram = max(0.0, d.gpu.vram_free_gib - reserve)
    head = (model.output.n_bytes + model.input.n_bytes / model.n_vocab) / GIB if is_rank0 else 0.0
    disk_gbps = d.disk.seq_read_gbps if d.os in ("linux", "android") else d.disk.rnd_read_gbps
    return DeviceCost(
        name=d.name, os=d.os, gpu_backend=d.gpu_backend, cpu_layer_ms=cpu_ms,
        gpu_layer_ms=gpu_ms, hop_ms=hop_ms(d, model, is_rank0), layer_gib=model.layer.n_bytes / GIB,
        kv_gib=model.kv_bytes_per_token_per_layer * ctx / GIB, head_gib=head,
        buffers_gib=_buffers_gib(model, ctx, is_rank0), ram_budget_gib=ram_budget_gib(d),
        disk_room_gib=d.disk.free_gib, disk_ms_per_gib=GIB / (disk_gbps * 1e9) * 1e3,
        vram_budget_gib=vram, is_rank0=is_rank0)


def cpu_layer_ms(d: DeviceProfile, model: ModelProfile, ctx: int) -> float:
    """a_m: one layer on the CPU at context ctx. From measured whole decode steps of this model
    (profile v2 `cpu.decode`: everything the engine does per layer, KV store included) plus the
    attention over the context beyond the position it was timed at; else from matvec speeds."""
    measured = d.decode_for(model)
    if measured is not None:
        extra_ctx = max(0, ctx - measured.n_ctx)
        return measured.layer_ms + _attn_s(d, model, extra_ctx, d.cpu_matvec,
                                           d.memory.read_gbps, "cpu.matvec") * 1e3
    return (_layer_ms(d, model, ctx, d.cpu_matvec, d.memory.read_gbps, "cpu.matvec")
            + d.kv_copy_ms_per_layer)


def _layer_ms(d: DeviceProfile, model: ModelProfile, ctx: int, matvec: dict[str, Throughput],
              mem_gbps: float, where: str) -> float:
    weights_s = _group_s(d, model.layer, matvec, mem_gbps, where)
    return (weights_s + _attn_s(d, model, ctx, matvec, mem_gbps, where)) * 1e3


def _attn_s(d: DeviceProfile, model: ModelProfile, ctx: int, matvec: dict[str, Throughput],
            mem_gbps: float, where: str) -> float:
    attn = _lookup(d, matvec, "F16", where, fallback_min=True)
    return max(model.attn_flops_per_token_per_ctx_per_layer * ctx / (attn.gflops * 1e9),
               model.kv_bytes_per_token_per_layer * ctx / (mem_gbps * 1e9))


def _group_s(d: DeviceProfile, group: TensorGroup, matvec: dict[str, Throughput],
             mem_gbps: float, where: str) -> float:
    """Decode is memory-bound: each type costs the slowest of compute, kernel and RAM rates."""
    total = 0.0
    for qtype in sorted(set(group.bytes_by_type) | set(group.flops_by_type)):
        n_bytes = group.bytes_by_type.get(qtype, 0.0)
        flops = group.flops_by_type.get(qtype, 0.0)
        seconds = n_bytes / (mem_gbps * 1e9)
        if flops > 0:
            t = _lookup(d, matvec, qtype, where)
            seconds = max(seconds, flops / (t.gflops * 1e9), n_bytes / (t.gbps * 1e9))
        total += seconds
    return total


def _lookup(d: DeviceProfile, matvec: dict[str, Throughput], qtype: str, where: str,
            fallback_min: bool = False) -> Throughput:
    if qtype in matvec:
        return matvec[qtype]
    if DEFAULT_QTYPE in matvec:
        return matvec[DEFAULT_QTYPE]
    if fallback_min:  # attention: no F16 figure, so assume the slowest measured type
        return min(matvec.values(), key=lambda t: t.gflops)
    raise ProfileError(f"{d.source}: device {d.name!r}, field '{where}': no entry for "
                       f"{qtype}, which the model uses; measure it or add a "
                       f"'{DEFAULT_QTYPE}' entry")


def hop_ms(d: DeviceProfile, model: ModelProfile, is_rank0: bool = False) -> float:
    """c_m: one window's hop. The activation (f32, one token) to the next device, plus the ring
    runtime's CPU work for the window (measured on loopback, so it holds the loopback hop's own
    syscalls too): a worker's per window, rank 0's per round. The Python runtime's share is
    larger than a LAN's latency, so leaving it out (as profiles before v3 do) favours many hops."""
    n_bytes = 4 * model.n_embd + ACTIVATION_HEADER_BYTES
    network = d.network.latency_ms + n_bytes / (d.network.bandwidth_gbps * 1e9) * 1e3
    if d.ring is None:
        return network
    return network + (d.ring.round_ms if is_rank0 else d.ring.window_ms)


def ram_budget_gib(d: DeviceProfile) -> float:
    budget = d.memory.available_gib
    if d.memory.cgroup_limit_gib is not None:
        budget = min(budget, d.memory.cgroup_limit_gib)
    if d.os == "android":
        budget = max(0.0, budget - ANDROID_RESERVE_GIB) + d.memory.swappable_gib
    return budget


def _buffers_gib(model: ModelProfile, ctx: int, is_rank0: bool) -> float:
    floats = 4 * model.n_embd + 2 * model.n_ff + model.n_head * ctx
    if is_rank0:
        floats += 2 * model.n_vocab  # logits and probabilities
    return 4 * floats / GIB


def fixed_ms(rank0: DeviceProfile, model: ModelProfile) -> float:
    """kappa, rank 0's work once per token: output layer on its CPU, embedding row, sampling;
    measured as a whole when the profile has decode steps of this model (schema v2)."""
    measured = rank0.decode_for(model)
    if measured is not None:
        return measured.fixed_ms
    ram = rank0.memory.read_gbps
    out_s = _group_s(rank0, model.output, rank0.cpu_matvec, ram, "cpu.matvec")
    row_s = model.input.n_bytes / model.n_vocab / (ram * 1e9)
    slowest = min(t.gflops for t in rank0.cpu_matvec.values())
    sample_s = SAMPLING_FLOPS_PER_VOCAB * model.n_vocab / (slowest * 1e9)
    return (out_s + row_s + sample_s) * 1e3


# ---------------------------------------------------------------------------------------------
# Memory and disk of one device


def ram_need_gib(c: DeviceCost, k: int, w: int, n: int) -> float:
    layers_in_ram = w if c.unified else w - n
    active = w > 0 or c.is_rank0
    return k * layers_in_ram * c.layer_need_gib + c.head_gib + (c.buffers_gib if active else 0.0)


def reread_gib(c: DeviceCost, k: int, w: int, n: int) -> float:
    over = ram_need_gib(c, k, w, n) - c.ram_budget_gib
    if over <= 0:
        return 0.0
    if c.unified:
        return k * w * c.layer_gib + c.head_gib
    return over


def case_of(c: DeviceCost, k: int, w: int, n: int) -> str:
    if ram_need_gib(c, k, w, n) <= c.ram_budget_gib:
        return "M4"
    if not c.unified:
        return "M3"
    return "M2" if c.gpu_backend == "metal" else "M1"


# ---------------------------------------------------------------------------------------------
# Whole split


def predict(costs: list[DeviceCost], split: Split, fixed: float) -> Prediction:
    k, ring = split.k, in_ring(split)
    per_device = []
    for i, c in enumerate(costs):
        w, n = split.w[i], split.n[i]
        reread = reread_gib(c, k, w, n)
        per_device.append(DeviceTerms(
            cpu_ms=k * (w - n) * c.cpu_layer_ms, gpu_ms=k * n * c.gpu_layer_ms,
            disk_ms=reread * c.disk_ms_per_gib, hop_ms=k * c.hop_ms if ring[i] else 0.0,
            case=case_of(c, k, w, n), ram_need_gib=ram_need_gib(c, k, w, n),
            vram_need_gib=k * n * c.layer_need_gib, reread_gib=reread))
    terms = {name: sum(getattr(t, f"{name}_ms") for t in per_device)
             for name in ("cpu", "gpu", "disk", "hop")}
    terms["fixed"] = fixed
    return Prediction(total_ms=sum(terms.values()), fixed_ms=fixed,
                      per_device=tuple(per_device), terms_ms=terms)


def in_ring(split: Split) -> list[bool]:
    """Rank 0 plus every device holding layers; a ring of one makes no hops."""
    members = [i == 0 or w > 0 for i, w in enumerate(split.w)]
    if sum(members) < 2:
        return [False] * len(split.w)
    return members


def objective(costs: list[DeviceCost], split: Split, fixed: float,
              master_priority: float = 1.0) -> float:
    """What Halda minimises: the latency, rank 0's layers scaled by 1/master_priority, minus
    the tie-break bonus for each device (other than rank 0) that keeps layers."""
    pred = predict(costs, split, fixed)
    rank0 = pred.per_device[0]
    scaled = (rank0.cpu_ms + rank0.gpu_ms) * (1.0 / master_priority - 1.0)
    n_active = sum(1 for w in split.w[1:] if w > 0)
    return pred.total_ms + scaled - ACTIVE_BONUS_MS * n_active


def violations(costs: list[DeviceCost], split: Split, n_layers: int,
               required: frozenset[int] = frozenset()) -> list[str]:
    """Every hard constraint the split breaks, in words; empty when the split is valid."""
    out = []
    if split.k < 1 or split.k * sum(split.w) != n_layers:
        out.append(f"windows_sum: k={split.k} x sum(w)={sum(split.w)} != {n_layers} layers")
    for i, c in enumerate(costs):
        w, n = split.w[i], split.n[i]
        out += _device_violations(c, split.k, w, n, required_active=i in required)
    return out


def _device_violations(c: DeviceCost, k: int, w: int, n: int, required_active: bool) -> list[str]:
    out = []
    if w < 0 or n < 0 or n > w:
        out.append(f"{c.name}: need 0 <= n ({n}) <= w ({w})")
    if required_active and w < 1:
        out.append(f"{c.name}: must keep at least one layer")
    if n > 0 and not c.has_gpu:
        out.append(f"{c.name}: {n} GPU layers but no usable GPU")
    if k * n * c.layer_need_gib > c.vram_budget_gib + 1e-9:
        out.append(f"{c.name}: vram_cap: {k * n * c.layer_need_gib:.2f} GiB of GPU layers > "
                   f"{c.vram_budget_gib:.2f} GiB usable")
    over = ram_need_gib(c, k, w, n) - c.ram_budget_gib
    if over > c.disk_room_gib + 1e-9:
        out.append(f"{c.name}: disk_room: {over:.2f} GiB over RAM > {c.disk_room_gib:.2f} GiB "
                   "disk room")
    return out


# ---------------------------------------------------------------------------------------------
# Capacity, for the "no plan fits" message


def capacity_gib(costs: list[DeviceCost]) -> dict[str, float]:
    """What the cluster offers: RAM budgets, usable CUDA VRAM (Metal shares RAM), disk room."""
    return {"ram": sum(c.ram_budget_gib for c in costs),
            "vram": sum(c.vram_budget_gib for c in costs if c.gpu_backend == "cuda"),
            "disk": sum(c.disk_room_gib for c in costs)}


def need_gib(costs: list[DeviceCost], n_layers: int) -> dict[str, float]:
    c0 = costs[0]
    return {"weights": n_layers * c0.layer_gib + c0.head_gib, "kv": n_layers * c0.kv_gib,
            "buffers": c0.buffers_gib}
