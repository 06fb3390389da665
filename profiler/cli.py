"""profile-tool: what this device can do with a model, for people (a table) and prima-plan (JSON).

    profile-tool -m model.gguf [-m other.gguf] [-o device.json] [-r 5] [--quick]
                 [--peer HOST:PORT] [--gpu-mem GIB] [--disk-dir DIR] [--no-fio]
    profile-tool --listen PORT        # on the next device of the ring, for --peer

Results go to stdout, progress to stderr with a `[profile]` prefix. Exit status: 0 done;
1 a measurement failed (peer unreachable, disk error); 2 bad input; 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import prima_ref  # noqa: F401  (Numba codegen flags before numba is imported)

# Defaults, full run / --quick, each with its reason.
REPEATS = (5, 3)  # llama-bench's -r default; three still gives a std
RAM_BUFFER_MIB = (512, 256)  # far past the caches of home devices (MODELS.md: >= 512 MB)
MATVEC_MAX_MIB = (1024, 256)  # bytes of one type streamed per pass; decode streams them all
SAMPLE_S = (0.2, 0.05)  # shortest matvec / KV-copy sample: many passes of a small model
DISK_FILE_MIB = (256, 64)  # temporary file; big enough that random reads are not one region
DISK_SAMPLE_S = (0.25, 0.1)  # per disk sample, as prima.cpp's fio runtime=1 s over 4 jobs
NET_SAMPLE_S = (0.3, 0.1)  # bulk send per bandwidth sample
GEN_TOKENS = (16, 8)  # decode steps per timed generation (real steps: the planner's figures)
RING_TOKENS = (16, 4)  # tokens per ring sample, each n_layers windows of one layer
RING_MAX_GIB = 4.0  # the loopback ring's worker maps every layer: only models this small
LISTEN_TIMEOUT_S = 300.0  # a forgotten `--listen` goes away by itself
BUSY_WARN_PCT = 20.0  # other processes' CPU share above which the figures are suspect


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="profile-tool", description="Measure this device for a model; write the device "
        "profile prima-plan reads.")
    p.add_argument("-m", "--model", action="append", default=[], metavar="GGUF",
                   help="model file; repeat for several (matvec per model, the rest once)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the device-profile JSON here "
                   "('-' for stdout)")
    p.add_argument("-r", "--repeats", type=int, help="samples per figure (default 5, quick 3)")
    p.add_argument("-t", "--threads", type=int, help="CPU threads (default: usable cores)")
    p.add_argument("--quick", action="store_true", help="shorter samples and smaller buffers "
                   "(under 10 s on a 2-core VM)")
    p.add_argument("--name", help="device name in the profile (default: hostname)")
    p.add_argument("--host", help="address the other ranks reach this device at "
                   "(default: hostname)")
    p.add_argument("--peer", metavar="HOST:PORT", help="measure the network to a "
                   "`profile-tool --listen PORT` there (the next device of the ring)")
    p.add_argument("--gpu-mem", type=float, metavar="GIB", help="cap the GPU memory prima-ref "
                   "may use (prima.cpp's --gpu-mem)")
    p.add_argument("--disk-dir", metavar="DIR", help="where the disk test's temporary file "
                   "goes (default: the first model's folder, i.e. its disk)")
    p.add_argument("--no-fio", action="store_true", help="use Python O_DIRECT reads even when "
                   "fio is installed")
    p.add_argument("--no-disk", action="store_true", help="skip the disk test")
    p.add_argument("--no-gpu", action="store_true", help="do not look for a GPU")
    p.add_argument("--no-decode", action="store_true", help="skip timing whole decode steps "
                   "(the planner then prices layers from matvec speeds alone)")
    p.add_argument("--no-ring", action="store_true", help="skip timing the ring runtime's own "
                   "work per window on a loopback ring (the planner then prices a hop by the "
                   "network alone)")
    p.add_argument("--listen", type=int, metavar="PORT", help="serve network probes for a "
                   "--peer on another device, then exit")
    p.add_argument("--bind", default="0.0.0.0", help="address --listen binds (default all)")
    p.add_argument("--listen-timeout", type=float, default=LISTEN_TIMEOUT_S, metavar="S",
                   help=f"--listen exits after S seconds without a probe "
                   f"(default {LISTEN_TIMEOUT_S:.0f})")
    p.add_argument("--keep-listening", action="store_true", help="serve several sessions "
                   "(until the timeout)")
    return p


def log(message: str) -> None:
    print(f"[profile] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Settings:
    repeats: int
    ram_buffer_mib: int
    matvec_max_mib: int
    sample_s: float
    disk_file_mib: int
    disk_sample_s: float
    net_sample_s: float
    gen_tokens: int

    @classmethod
    def of(cls, args) -> Settings:
        i = 1 if args.quick else 0
        return cls(repeats=args.repeats or REPEATS[i], ram_buffer_mib=RAM_BUFFER_MIB[i],
                   matvec_max_mib=MATVEC_MAX_MIB[i], sample_s=SAMPLE_S[i],
                   disk_file_mib=DISK_FILE_MIB[i], disk_sample_s=DISK_SAMPLE_S[i],
                   net_sample_s=NET_SAMPLE_S[i], gen_tokens=GEN_TOKENS[i])


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        if args.listen is not None:
            from profiler.network import listen

            return listen(args.listen, bind=args.bind, timeout_s=args.listen_timeout,
                          keep=args.keep_listening, log=lambda m: print(f"[net] {m}",
                                                                        file=sys.stderr,
                                                                        flush=True))
        if not args.model:
            print("profile-tool: give a model with -m MODEL.gguf (or --listen PORT on a peer)",
                  file=sys.stderr)
            return 2
        return _profile(args)
    except KeyboardInterrupt:
        print("profile-tool: interrupted; temporary files removed", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C, so finally blocks remove temp files


def _profile(args) -> int:
    from planner.profiles import ProfileError, device_from_dict
    from profiler import compute, network, report, system
    from profiler.model import load_model_info

    t_start, cpu_start = time.perf_counter(), system.cpu_times()
    s = Settings.of(args)
    if s.repeats < 1:
        print("profile-tool: -r must be at least 1", file=sys.stderr)
        return 2
    try:
        infos = [load_model_info(m) for m in args.model]
    except ProfileError as e:
        print(f"profile-tool: {e}", file=sys.stderr)
        return 2

    net = None
    if args.peer:
        log(f"network to {args.peer} ...")
        try:
            net = network.probe(args.peer, n_embd=infos[0].profile.n_embd, repeats=s.repeats,
                                seconds=s.net_sample_s)
        except (network.PeerUnreachable, ValueError) as e:
            print(f"profile-tool: {e}", file=sys.stderr)
            return 1
        log(f"network: {net.latency_ms.fmt(3)} ms one way, {net.bandwidth_gbps.fmt(3)} GB/s")

    os_name = system.detect_os()
    mem = system.memory_info(os_name)  # first, before our own buffers inflate the usage
    log(f"memory: {mem.total_gib:.2f} GiB total, {mem.available_gib:.2f} GiB available"
        + (f", cgroup limit {mem.cgroup_limit_gib:.2f} GiB" if mem.cgroup_limit_gib else ""))
    cores = system.cpu_cores()
    threads = args.threads or cores.usable
    cpu = system.cpu_name()
    log(f"cpu: {cpu}, {cores.usable} usable cores, {threads} threads")

    # before the CPU tests: an interrupted run then has its temporary file early, and the
    # disk figures do not depend on them
    disk, target, disk_reason = _profile_disk(args, infos[0], s)

    models = [_profile_model(info, threads, s, decode=not args.no_decode) for info in infos]

    log(f"RAM read bandwidth ({s.ram_buffer_mib} MiB) ...")
    ram = compute.ram_bandwidth(s.ram_buffer_mib, threads, s.repeats)
    log(f"RAM read: {ram.all_threads_gbps.fmt()} GB/s ({threads} threads), "
        f"{ram.one_thread_gbps.fmt()} GB/s (1 thread)")

    gpus, gpu_reason = _profile_gpu(args, s)

    hostname = socket.gethostname()
    run = report.DeviceRun(
        name=args.name or hostname, host=args.host or hostname, hostname=hostname, os=os_name,
        cpu_name=cpu, cores=cores, threads=threads, memory=mem, ram=ram, models=models,
        disk=disk, disk_target=target, disk_skip_reason=disk_reason, gpus=gpus,
        gpu_reason=gpu_reason, network=net,
        settings={"repeats": s.repeats, "quick": bool(args.quick),
                  "matvec_max_mib": s.matvec_max_mib, "sample_s": s.sample_s},
        timestamp_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        tool_version=prima_ref.__version__)
    run.others_busy_pct = system.others_busy_pct(cpu_start, system.cpu_times())
    # after the busy figure: the ring's worker is a child process, which it would count
    run.ring, run.ring_reason = _profile_ring(args, infos[0], s)
    run.elapsed_s = round(time.perf_counter() - t_start, 2)
    if run.others_busy_pct is not None and run.others_busy_pct > BUSY_WARN_PCT:
        log(f"warning: other processes used {run.others_busy_pct:.0f}% of the CPUs during "
            f"this run; matvec and RAM figures are low by up to the share they took and more "
            f"(parallel kernels wait for their slowest thread); re-run on an idle device")
    profile = report.device_profile(run)
    device_from_dict(profile, "profile-tool output")  # what prima-plan will check, checked now
    print(report.model_table(models))
    print()
    print(report.device_table(run))
    if args.output:
        text = json.dumps(profile, indent=2) + "\n"
        if args.output == "-":
            sys.stdout.write(text)
        else:
            Path(args.output).write_text(text)
            log(f"wrote {args.output}")
    log(f"done in {run.elapsed_s:.1f} s")
    return 0 if disk is not None or args.no_disk else 1


def _profile_model(info, threads: int, s: Settings, decode: bool = True):
    from profiler import compute, report
    from profiler.decode import decode_profile

    p = info.profile
    log(f"model {info.label}: {p.n_layers} layers, types "
        f"{', '.join(sorted(info.matvec_tensors))}")
    matvec = {}
    for qtype, tensors in sorted(info.matvec_tensors.items()):
        r = compute.matvec_throughput(info.path, tensors, threads=threads, repeats=s.repeats,
                                      max_bytes=s.matvec_max_mib << 20,
                                      min_seconds=s.sample_s)
        log(f"matvec {qtype}: {r.gbps.fmt()} GB/s, {r.gflops.fmt()} GFLOP/s "
            f"({r.n_tensors} tensors, {r.working_set_bytes / 2**20:.0f} MiB; "
            f"first pass {r.warmup_s:.2f} s)")
        matvec[qtype] = r
    kv = compute.kv_copy_ms(p.n_head_kv, p.head_dim, p.n_layers, s.repeats, s.sample_s / 4)
    lookup = compute.input_lookup_ms(info.path, s.repeats, s.sample_s / 4)
    log(f"KV copy: {kv.fmt(4)} ms per layer")
    steps = None
    if decode:
        t0 = time.perf_counter()
        steps = decode_profile(info.path, threads=threads, repeats=s.repeats,
                               max_bytes=s.matvec_max_mib << 20, min_seconds=s.sample_s,
                               gen_tokens=s.gen_tokens)
        how = ("real generation steps" if steps.step is not None else
               "pieces alone: the layers are over the byte cap, or every generation "
               "tried ended at once")
        log(f"decode: {steps.layer_ms:.3f} ms per layer, fixed {steps.fixed_ms:.3f} ms "
            f"({how}); pieces: layer {steps.mix_layer_ms:.3f} ({len(steps.mixes)} quant "
            f"mixes), head {steps.head_ms.mean:.3f}, sampling {steps.sample_ms.mean:.3f}; "
            f"{steps.clock} time, {time.perf_counter() - t0:.1f} s")
    return report.ModelRun(info=info, matvec=matvec, kv_copy_ms=kv, input_lookup_ms=lookup,
                           decode=steps)


def _profile_ring(args, info, s: Settings):
    from profiler.ring import RingUnavailable, ring_overhead

    if args.no_ring:
        return None, "--no-ring"
    if info.profile.total_bytes > RING_MAX_GIB * 2**30:
        return None, (f"{info.label} is over {RING_MAX_GIB:g} GiB and the loopback ring maps "
                      "every layer; profile with a small model too (-m small.gguf first)")
    tokens = RING_TOKENS[1 if args.quick else 0]
    log(f"ring: 2 ranks on loopback, 1 thread each, -lw 0,1 ({info.profile.n_layers} windows "
        f"a token), {tokens} tokens x {s.repeats} ...")
    try:
        r = ring_overhead(info.path, tokens=tokens, repeats=s.repeats,
                          max_bytes=s.matvec_max_mib << 20, min_seconds=s.sample_s)
    except RingUnavailable as e:
        log(f"ring: {e}")
        return None, str(e)
    log(f"ring: {r.window_ms.fmt(3)} ms CPU per window beyond its layer, rank 0 "
        f"{r.round_ms.fmt(3)} ms per round")
    return r, ""


def _profile_disk(args, info, s: Settings):
    from profiler import disk

    if args.no_disk:
        return None, None, "--no-disk"
    directory = Path(args.disk_dir) if args.disk_dir else info.path.resolve().parent
    target = disk.disk_target(directory)
    use_fio = not args.no_fio and disk.fio_binary() is not None
    log(f"disk: {target.device} under {directory}, {target.read_ahead_kib} KiB read-ahead, "
        f"{'fio' if use_fio else 'O_DIRECT'} ...")
    try:
        result = disk.measure_disk(target, model_path=info.path.resolve(),
                                   size_bytes=s.disk_file_mib << 20, repeats=s.repeats,
                                   seconds=s.disk_sample_s, use_fio=use_fio, log=log)
    except (OSError, RuntimeError, ValueError) as e:
        log(f"disk test failed: {e}")
        return None, target, f"failed: {e}"
    log(f"disk ({result.method}): seq {result.seq_read_gbps.fmt(3)} GB/s, "
        f"rnd {result.rnd_read_gbps.fmt(3)} GB/s")
    return result, target, ""


def _profile_gpu(args, s: Settings):
    from profiler import gpu

    if args.no_gpu:
        return [], "--no-gpu"
    try:
        gpus = gpu.with_kernel_matvec(gpu.probe_gpus(args.gpu_mem, s.repeats), s.repeats)
    except gpu.CudaUnavailable as e:
        log(f"gpu: none ({e})")
        return [], str(e)
    for g in gpus:
        log(f"gpu {g.index}: {g.name}, {g.vram_free_gib:.1f}/{g.vram_total_gib:.1f} GiB free"
            + (", prima_ref kernels measured" if g.matvec else
               f", no kernel figures ({g.matvec_reason})" if g.matvec_reason else ""))
    return gpus, ""


if __name__ == "__main__":
    raise SystemExit(main())
