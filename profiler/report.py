"""What a run produces: the device-profile JSON that prima-plan reads, and tables for people.

The JSON is planner.profiles' "prima-ref/device-profile", schema_version 3 (planner/README.md).
Fields the planner reads carry the means; everything else (std, samples' settings, the
models' figures, which method measured what, hostname, timestamp, tool version) goes under
"extra", with the unit in every field name as in the planner's fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.profiles import DEVICE_SCHEMA, DEVICE_SCHEMA_VERSION
from profiler.compute import MatvecResult, RamBandwidth
from profiler.decode import DecodeResult, decode_entry, decode_extra
from profiler.disk import DiskResult, DiskTarget
from profiler.gpu import GpuInfo
from profiler.model import ModelInfo, model_summary, ms_per_layer
from profiler.network import NetworkResult
from profiler.ring import RingResult, ring_entry, ring_extra
from profiler.stats import Stat
from profiler.system import CpuCores, MemoryInfo

# No peer given: a ring hop still needs numbers. A wired gigabit LAN, flagged as assumed.
ASSUMED_LATENCY_MS = 1.0
ASSUMED_BANDWIDTH_GBPS = 0.1
# Disk not measured (--no-disk, or it failed): a slow SD card, flagged as assumed, so the
# planner never counts on a disk it knows nothing about.
ASSUMED_SEQ_READ_GBPS = 0.05
ASSUMED_RND_READ_GBPS = 0.005


@dataclass
class ModelRun:
    info: ModelInfo
    matvec: dict[str, MatvecResult]
    kv_copy_ms: Stat
    input_lookup_ms: Stat | None
    decode: DecodeResult | None = None  # whole decode steps (None: --no-decode)

    def ms_per_layer(self) -> float:
        gbps = {q: r.gbps.mean for q, r in self.matvec.items()}
        return ms_per_layer(self.info.profile.layer.bytes_by_type, gbps)

    def output_ms(self) -> float:
        gbps = {q: r.gbps.mean for q, r in self.matvec.items()}
        return ms_per_layer(self.info.profile.output.bytes_by_type, gbps)


@dataclass
class DeviceRun:
    name: str
    host: str
    hostname: str
    os: str
    cpu_name: str
    cores: CpuCores
    threads: int
    memory: MemoryInfo
    ram: RamBandwidth
    models: list[ModelRun]
    disk: DiskResult | None
    disk_target: DiskTarget | None
    disk_skip_reason: str
    gpus: list[GpuInfo]
    gpu_reason: str
    network: NetworkResult | None
    settings: dict = field(default_factory=dict)  # repeats, quick, ... (units in the keys)
    timestamp_utc: str = ""
    tool_version: str = ""
    elapsed_s: float = 0.0
    others_busy_pct: float | None = None  # CPU other processes used during the run
    ring: RingResult | None = None  # the ring runtime's own cost (None: not measured)
    ring_reason: str = ""  # why not


def device_profile(run: DeviceRun) -> dict:
    matvec = _cpu_matvec(run.models)
    disk = run.disk
    net = run.network
    return {
        "schema": DEVICE_SCHEMA, "schema_version": DEVICE_SCHEMA_VERSION,
        "name": run.name, "host": run.host, "os": run.os,
        "cpu": {"name": run.cpu_name, "cores": run.cores.usable,
                "kv_copy_ms_per_layer": run.models[0].kv_copy_ms.mean,
                "matvec": {q: {"gbps": r.gbps.mean, "gflops": r.gflops.mean}
                           for q, r in matvec.items()},
                "decode": [decode_entry(m.decode, m.info.profile) for m in run.models
                           if m.decode is not None]},
        "memory": {"total_gib": run.memory.total_gib,
                   "available_gib": run.memory.available_gib,
                   "read_gbps": run.ram.all_threads_gbps.mean,
                   "swap_total_gib": run.memory.swap_total_gib,
                   "swappable_gib": run.memory.swappable_gib,
                   "page_cache_gib": run.memory.page_cache_gib,
                   "cgroup_limit_gib": run.memory.cgroup_limit_gib},
        "disk": {"seq_read_gbps": disk.seq_read_gbps.mean if disk else ASSUMED_SEQ_READ_GBPS,
                 "rnd_read_gbps": disk.rnd_read_gbps.mean if disk else ASSUMED_RND_READ_GBPS,
                 "free_gib": run.disk_target.free_gib if run.disk_target else 0.0},
        "gpu": _gpu_profile(run),  # None unless prima_ref's GPU kernels ran on it
        "network": {"latency_ms": net.latency_ms.mean if net else ASSUMED_LATENCY_MS,
                    "bandwidth_gbps": net.bandwidth_gbps.mean if net
                    else ASSUMED_BANDWIDTH_GBPS},
        "ring": (ring_entry(run.ring, run.models[0].info.profile.name)
                 if run.ring is not None else None),
        "extra": _extra(run, matvec),
    }


def _cpu_matvec(models: list[ModelRun]) -> dict[str, MatvecResult]:
    """One figure per quant type: the first model's that has it (models are listed by -m)."""
    out: dict[str, MatvecResult] = {}
    for m in models:
        for q, r in m.matvec.items():
            out.setdefault(q, r)
    return out


def _extra(run: DeviceRun, matvec: dict[str, MatvecResult]) -> dict:
    mem, ram = run.memory, run.ram
    return {
        "tool": "profile-tool", "tool_version": run.tool_version, "hostname": run.hostname,
        "timestamp_utc": run.timestamp_utc, "elapsed_s": run.elapsed_s, **run.settings,
        "cpu": {
            "threads_used": run.threads, "cores_logical": run.cores.logical,
            "cores_affinity": run.cores.affinity, "cgroup_quota_cores": run.cores.quota_cores,
            "others_busy_pct": run.others_busy_pct,
            "kv_copy_ms_per_layer_std": run.models[0].kv_copy_ms.std,
            "matvec": {q: _matvec_extra(r) for q, r in matvec.items()},
        },
        "memory": {
            "definition": "available = what a process started in place of profile-tool could "
                          "take: MemAvailable + profile-tool's anonymous memory, capped by "
                          "every cgroup limit - (usage - file cache - profile-tool's "
                          "anonymous memory)",
            "host_available_gib": mem.host_available_gib, "own_anon_gib": mem.own_anon_gib,
            "swap_free_gib": mem.swap_free_gib, "source": mem.source,
            "read_gbps_std": ram.all_threads_gbps.std,
            "read_1thread_gbps": ram.one_thread_gbps.mean,
            "read_1thread_gbps_std": ram.one_thread_gbps.std,
            "read_buffer_mib": ram.buffer_mib,
            "cgroups": [{"version": c.version, "path": c.path,
                         "limit_gib": None if c.limit_bytes is None else c.limit_bytes / 2**30,
                         "usage_gib": c.usage_bytes / 2**30, "file_cache_gib": c.file_bytes
                         / 2**30, "swap_limit_gib": None if c.swap_limit_bytes is None
                         else c.swap_limit_bytes / 2**30} for c in mem.cgroups],
            "pressure": mem.pressure,
        },
        "disk": _disk_extra(run),
        "gpu": _gpu_extra(run),
        "network": _network_extra(run.network),
        "ring": (ring_extra(run.ring) if run.ring is not None
                 else {"measured": False, "reason": run.ring_reason}),
        "models": [_model_extra(m) for m in run.models],
    }


def _matvec_extra(r: MatvecResult) -> dict:
    return {"gbps_std": r.gbps.std, "gflops_std": r.gflops.std, "n_tensors": r.n_tensors,
            "working_set_mib": r.working_set_bytes / 2**20,
            "shapes_rows_cols": [list(s) for s in r.shapes], "warmup_s": r.warmup_s}


def _disk_extra(run: DeviceRun) -> dict:
    if run.disk is None:
        return {"measured": False, "reason": run.disk_skip_reason + "; seq_read_gbps and "
                "rnd_read_gbps are assumed (a slow SD card)"}
    d, t = run.disk, run.disk_target
    return {"measured": True, "method": d.method, "directory": str(t.directory),
            "device": t.device, "read_ahead_kib": t.read_ahead_kib,
            "read_ahead_source": t.read_ahead_source, "page_bytes": t.page_bytes,
            "seq_block_kib": t.read_ahead_kib, "rnd_block_bytes": t.page_bytes,
            "queue_depth": 1, "seq_read_gbps_std": d.seq_read_gbps.std,
            "rnd_read_gbps_std": d.rnd_read_gbps.std, "file_mib": d.file_bytes / 2**20,
            "file_kind": d.file_kind, "write_seq_gbps": d.write_gbps}


def _gpu_profile(run: DeviceRun) -> dict | None:
    """The planner-facing GPU: the first one, when prima_ref's kernels were timed on it."""
    g = run.gpus[0] if run.gpus else None
    if g is None or not g.matvec:
        return None
    return {"name": g.name, "is_cuda": True, "has_metal": False,
            "vram_total_gib": g.vram_total_gib, "vram_free_gib": g.vram_free_gib,
            "bandwidth_gbps": g.bandwidth_gbps.mean if g.bandwidth_gbps else
            max(m.gbps.mean for m in g.matvec.values()),
            "matvec": {q: {"gbps": m.gbps.mean, "gflops": m.gflops.mean}
                       for q, m in g.matvec.items()}}


def _gpu_extra(run: DeviceRun) -> dict:
    if not run.gpus:
        return {"present": False, "reason": run.gpu_reason}
    usable = bool(run.gpus[0].matvec)
    return {"present": True, "usable_by_prima_ref": usable,
            "reason": "prima_ref's GPU kernels timed on device 0" if usable else
            (run.gpus[0].matvec_reason or "prima_ref's GPU kernels did not run"),
            "devices": [{"index": g.index, "name": g.name, "vram_total_gib": g.vram_total_gib,
                         "vram_free_gib": g.vram_free_gib,
                         "vram_free_uncapped_gib": g.vram_free_uncapped_gib,
                         **({"copy_bandwidth_gbps": g.bandwidth_gbps.mean,
                             "copy_bandwidth_gbps_std": g.bandwidth_gbps.std}
                            if g.bandwidth_gbps else {})} for g in run.gpus]}


def _network_extra(net: NetworkResult | None) -> dict:
    if net is None:
        return {"measured": False,
                "reason": "no --peer given: latency_ms and bandwidth_gbps are assumed "
                          "(wired gigabit LAN); run `profile-tool --listen PORT` on the next "
                          "device and pass --peer HOST:PORT here"}
    return {"measured": True, "peer": net.peer, "latency_ms_std": net.latency_ms.std,
            "bandwidth_gbps_std": net.bandwidth_gbps.std, "ping_bytes": net.ping_bytes,
            "bulk_message_bytes": net.bulk_message_bytes,
            "latency_definition": "median round trip / 2 of 20 pings per sample"}


def _model_extra(m: ModelRun) -> dict:
    out = model_summary(m.info)
    out["cpu_matvec"] = {q: {"gbps": r.gbps.mean, "gbps_std": r.gbps.std,
                             "gflops": r.gflops.mean, "gflops_std": r.gflops.std}
                         for q, r in m.matvec.items()}
    out["cpu_ms_per_layer"] = m.ms_per_layer()
    out["cpu_output_ms"] = m.output_ms()
    out["kv_copy_ms_per_layer"] = m.kv_copy_ms.mean
    if m.decode is not None:
        out["cpu_decode"] = decode_extra(m.decode)
    if m.input_lookup_ms is not None:
        out["input_lookup_ms"] = m.input_lookup_ms.mean
    return out


# ---------------------------------------------------------------------------------------------
# Tables (markdown, llama-bench style: one row per test, mean ± std over -r repeats)


def _size(n_bytes: float) -> str:
    if n_bytes < 2**20:
        return f"{n_bytes / 2**10:.1f} KiB"
    return f"{n_bytes / 2**20:.2f} MiB" if n_bytes < 2**30 else f"{n_bytes / 2**30:.2f} GiB"


def _types(table: dict[str, float], fmt) -> str:
    return ", ".join(f"{q} {fmt(v)}" for q, v in sorted(table.items(), key=lambda kv: -kv[1]))


def model_table(models: list[ModelRun]) -> str:
    rows = ["| model | layers | vocab | layer bytes by type | layer MFLOP by type | "
            "attn FLOP/ctx token/layer | KV B/token/layer | input | output (bytes; MFLOP) |",
            "| --- | ---: | ---: | --- | --- | ---: | ---: | --- | --- |"]
    for m in models:
        p = m.info.profile
        tied = " (tied: token_embd)" if m.info.tied_output else ""
        rows.append(
            f"| {m.info.label} | {p.n_layers} | {p.n_vocab} | "
            f"{_types(p.layer.bytes_by_type, _size)} | "
            f"{_types(p.layer.flops_by_type, lambda f: f'{f / 1e6:.2f}')} | "
            f"{p.attn_flops_per_token_per_ctx_per_layer:.0f} | "
            f"{p.kv_bytes_per_token_per_layer:.0f} | "
            f"{_size(p.input.n_bytes) if p.input.n_bytes else 'in output' + tied} | "
            f"{_types(p.output.bytes_by_type, _size)}; "
            f"{_types(p.output.flops_by_type, lambda f: f'{f / 1e6:.1f}')}{tied} |")
    return "\n".join(rows)


def device_table(run: DeviceRun, digits: int = 2) -> str:
    rows = ["| device | model | threads | test | result |", "| --- | --- | ---: | --- | ---: |"]

    def row(model: str, test: str, value: str, threads=run.threads):
        rows.append(f"| {run.name} | {model} | {threads} | {test} | {value} |")

    for m in run.models:
        for q, r in m.matvec.items():
            ws = _size(r.working_set_bytes)
            row(m.info.label, f"matvec {q} GB/s ({r.n_tensors} tensors, {ws})", r.gbps.fmt())
            row(m.info.label, f"matvec {q} GFLOP/s", r.gflops.fmt())
        row(m.info.label, "CPU ms per layer (weights at matvec speed)",
            f"{m.ms_per_layer():.3f}")
        row(m.info.label, "CPU ms output layer", f"{m.output_ms():.3f}")
        row(m.info.label, "KV copy ms per layer", m.kv_copy_ms.fmt(4), 1)
        if m.decode is not None:
            d = m.decode
            for mix in d.mixes:
                types = "+".join(sorted({q for _, q in mix.mix}))
                row(m.info.label, f"decode ms per layer, {types} ({mix.n_layers} layers, "
                    f"{mix.n_timed} timed, pos {d.pos})", mix.layer_ms.fmt(3))
            row(m.info.label, "decode ms embedding + output head", d.head_ms.fmt(3))
            if d.step is not None:
                st = d.step
                row(m.info.label, f"generation ms per step ({st.tokens} steps, mean pos "
                    f"{st.mean_pos:.0f})", st.step_ms.fmt(3))
                row(m.info.label, "generation ms per step in the layers", st.layers_ms.fmt(3))
                row(m.info.label, "planner: ms per layer / fixed ms per token",
                    f"{d.layer_ms:.3f} / {d.fixed_ms:.3f}")
            row(m.info.label, "decode ms sampling (default chain / greedy)",
                f"{d.sample_ms.fmt(3)} / {d.sample_greedy_ms.mean:.3f}", 1)
        if m.input_lookup_ms is not None:
            row(m.info.label, "embedding row lookup ms", m.input_lookup_ms.fmt(4), 1)
    row("-", f"RAM read GB/s ({run.ram.buffer_mib:.0f} MiB)", run.ram.all_threads_gbps.fmt())
    row("-", "RAM read GB/s, 1 thread", run.ram.one_thread_gbps.fmt(), 1)
    if run.disk:
        d, t = run.disk, run.disk_target
        row("-", f"disk seq read GB/s ({t.read_ahead_kib} KiB blocks, {d.method})",
            d.seq_read_gbps.fmt(3), 1)
        row("-", f"disk rnd read GB/s ({t.page_bytes} B blocks, {d.method})",
            d.rnd_read_gbps.fmt(3), 1)
    else:
        row("-", "disk", f"not measured: {run.disk_skip_reason}", 1)
    if run.network:
        n = run.network
        row("-", f"network latency ms (one way, to {n.peer})", n.latency_ms.fmt(3), 1)
        row("-", f"network GB/s ({_size(n.bulk_message_bytes)} messages)",
            n.bandwidth_gbps.fmt(3), 1)
    if run.ring is not None:
        r = run.ring
        row(run.models[0].info.label, f"ring CPU ms per window beyond its layers (loopback, "
            f"{r.k} windows a token)", r.window_ms.fmt(3))
        row(run.models[0].info.label, "ring CPU ms per round on rank 0 beyond its head",
            r.round_ms.fmt(3))
    else:
        row("-", "ring", f"not measured: {run.ring_reason}", "-")
    if run.others_busy_pct is not None:
        row("-", "CPU used by other processes during the run %", f"{run.others_busy_pct:.0f}",
            "-")
    mem = run.memory
    limit = "none" if mem.cgroup_limit_gib is None else f"{mem.cgroup_limit_gib:.2f}"
    row("-", "memory GiB total / available / cgroup limit",
        f"{mem.total_gib:.2f} / {mem.available_gib:.2f} / {limit}", "-")
    row("-", "swap total GiB / page cache GiB",
        f"{mem.swap_total_gib:.2f} / {mem.page_cache_gib:.2f}", "-")
    psi = mem.pressure
    row("-", "memory pressure (PSI some avg10/avg60 %)",
        f"{psi['some_avg10_pct']:.2f} / {psi['some_avg60_pct']:.2f}"
        if psi.get("available") else "n/a", "-")
    if run.gpus:
        for g in run.gpus:
            bw = g.bandwidth_gbps.fmt(0) if g.bandwidth_gbps else "n/a"
            row("-", f"GPU {g.index} {g.name}: free/total GiB; copy GB/s",
                f"{g.vram_free_gib:.1f}/{g.vram_total_gib:.1f}; {bw}", "-")
    else:
        row("-", "GPU", f"none ({run.gpu_reason})", "-")
    return "\n".join(rows)
