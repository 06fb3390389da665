"""Device and model profiles: the versioned JSON contract between profile-tool and prima-plan.

Three documents, each a JSON object with "schema" and "schema_version" (planner/README.md shows
full examples):

    prima-ref/device-profile  one measured device, written by profile-tool
    prima-ref/model-profile   one model's bytes and FLOPs per layer (planner/model_profile.py)
    prima-ref/cluster         a what-if cluster in a short hand-written form (JSON or TOML)

Units are in every field name. Bandwidths (`_gbps`) are GB/s, 1e9 bytes per second, network
included; sizes (`_gib`) are GiB, 2^30 bytes; throughput (`_gflops`) is 1e9 FLOP/s of decode
matvec work; times are `_ms`. Quant types use GGML names ("Q4_K", "Q6_K", "F16"); a throughput
table may hold a "default" entry used for types it does not list.

Every loader checks every field and raises ProfileError naming the file and the field, never a
bare KeyError or assert: profiles are hand-edited and come from other machines.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1  # model profiles, clusters, plans
# Device profiles: v2 adds the optional `cpu.decode` (whole decode steps per model); v1 files,
# which lack it, still load and are priced from their matvec speeds as before. v3 adds the
# optional `ring` (the ring runtime's own CPU cost per window); without it a hop costs only
# the network, as before.
DEVICE_SCHEMA_VERSION = 3
DEVICE_SCHEMA_VERSIONS = (1, 2, 3)
DEVICE_SCHEMA = "prima-ref/device-profile"
MODEL_SCHEMA = "prima-ref/model-profile"
CLUSTER_SCHEMA = "prima-ref/cluster"
OS_NAMES = ("linux", "macos", "android", "windows")
DEFAULT_QTYPE = "default"


class ProfileError(ValueError):
    """A profile file is unreadable or a field is missing or wrong: names file and field."""


# ---------------------------------------------------------------------------------------------
# Dataclasses


@dataclass(frozen=True)
class Throughput:
    """Decode matvec speed for one quant type: weight bytes streamed and FLOPs per second."""

    gbps: float
    gflops: float


@dataclass(frozen=True)
class DecodeCost:
    """Measured whole decode steps of one model on this device (profile-tool's decode.py):
    what the engine pays per layer and for rank 0's fixed work, non-matvec work included."""

    model: str  # model name, with n_layers and layer_bytes it identifies the file's quant mix
    n_layers: int
    layer_bytes: float  # weight bytes of the average layer
    layer_ms: float  # one token through the average layer, KV store included
    fixed_ms: float  # rank 0's rest of a step: embedding, output norm and head, sampling, the
    # generation loop (profile-tool times real Engine.generate steps; older files: the pieces)
    n_ctx: int  # KV entries the timed token's attention read (its position + 1)
    n_threads: int

    def matches(self, model: ModelProfile) -> bool:
        return (self.model == model.name and self.n_layers == model.n_layers
                and abs(self.layer_bytes - model.layer.n_bytes) <= 1e-6 * model.layer.n_bytes)


@dataclass(frozen=True)
class RingCost:
    """The ring runtime's own CPU work on this device (profile-tool's ring.py, loopback): what
    a window costs a rank beyond its layers, and rank 0's cost per round beyond its head."""

    window_ms: float  # a worker: receive, decode, check, frame, send, bookkeeping, its threads
    round_ms: float  # rank 0: frame, send, wait, receive, decode, its threads
    n_embd: int = 0  # the activation width it was measured with (0: a what-if device)
    model: str = ""


@dataclass(frozen=True)
class Memory:
    total_gib: float
    available_gib: float  # what the OS will give this process without swapping (MemAvailable)
    read_gbps: float  # streaming RAM read bandwidth, all cores
    swap_total_gib: float = 0.0
    swappable_gib: float = 0.0  # anonymous memory the OS may swap out first (Android)
    page_cache_gib: float = 0.0
    cgroup_limit_gib: float | None = None  # container memory limit, when one applies


@dataclass(frozen=True)
class Disk:
    seq_read_gbps: float  # read-ahead-sized blocks, page cache bypassed
    rnd_read_gbps: float  # page-sized blocks, page cache bypassed
    free_gib: float  # room on the model's disk for the part of a share that overflows RAM


@dataclass(frozen=True)
class Gpu:
    name: str
    is_cuda: bool
    has_metal: bool
    vram_total_gib: float
    vram_free_gib: float  # CUDA: free VRAM; Metal: recommendedMaxWorkingSetSize
    bandwidth_gbps: float
    matvec: dict[str, Throughput]
    kv_copy_ms_per_layer: float = 0.0


@dataclass(frozen=True)
class Network:
    latency_ms: float  # one-way latency to the next device in the ring
    bandwidth_gbps: float  # GB/s (not Gbit/s) to the next device


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    host: str
    os: str
    cpu_name: str
    cpu_cores: int
    cpu_matvec: dict[str, Throughput]
    kv_copy_ms_per_layer: float  # CPU time to append one token's K and V for one layer
    memory: Memory
    disk: Disk
    network: Network
    gpu: Gpu | None = None
    source: str = ""  # where it was read from, for error messages
    decode: tuple[DecodeCost, ...] = ()  # measured decode steps, per model (schema v2)
    ring: RingCost | None = None  # the ring runtime's own cost (schema v3)

    def decode_for(self, model: ModelProfile) -> DecodeCost | None:
        return next((d for d in self.decode if d.matches(model)), None)

    @property
    def gpu_backend(self) -> str:
        if self.gpu is None:
            return "none"
        return "cuda" if self.gpu.is_cuda else "metal"


@dataclass(frozen=True)
class TensorGroup:
    """Bytes and per-token FLOPs of a group of tensors (one average layer, input or output)."""

    bytes_by_type: dict[str, float]
    flops_by_type: dict[str, float]

    @property
    def n_bytes(self) -> float:
        return float(sum(self.bytes_by_type.values()))


@dataclass(frozen=True)
class ModelProfile:
    name: str
    arch: str
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    layer: TensorGroup  # the average repeating block, as prima.cpp does
    input: TensorGroup  # token embedding (a row lookup per token, so no FLOPs)
    output: TensorGroup  # output norm and output matrix
    kv_bytes_per_token_per_layer: float  # K and V at f16
    attn_flops_per_token_per_ctx_per_layer: float  # 2*2*n_head*head_dim: QK and AV
    file: str | None = None
    sha256: str | None = None
    source: str = ""

    @property
    def total_bytes(self) -> float:
        return self.n_layers * self.layer.n_bytes + self.input.n_bytes + self.output.n_bytes


# ---------------------------------------------------------------------------------------------
# Checked field access


@dataclass
class _Fields:
    """One JSON object being read; every error names the file and the dotted field path."""

    data: dict
    source: str
    prefix: str = ""
    used: set = field(default_factory=set)

    def _where(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def fail(self, key: str, what: str) -> ProfileError:
        return ProfileError(f"{self.source}: field '{self._where(key)}': {what}")

    def raw(self, key: str, default=...):
        self.used.add(key)
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise self.fail(key, "missing (required)")
            return default
        return self.data[key]

    def num(self, key: str, default=..., minimum: float = 0.0, positive=False) -> float:
        value = self.raw(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            raise self.fail(key, f"expected a finite number, found {value!r}")
        if value < minimum or (positive and value <= 0):
            bound = f"> {minimum}" if positive else f">= {minimum}"
            raise self.fail(key, f"expected a number {bound}, found {value!r}")
        return float(value)

    def integer(self, key: str, default=..., minimum: int = 0) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, f"expected an integer >= {minimum}, found {value!r}")
        return int(value)

    def text(self, key: str, default=..., choices: tuple[str, ...] | None = None) -> str:
        value = self.raw(key, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a non-empty string, found {value!r}")
        if choices is not None and value.lower() not in choices:
            raise self.fail(key, f"expected one of {', '.join(choices)}, found {value!r}")
        return value.lower() if choices is not None else value

    def flag(self, key: str, default=...) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, found {value!r}")
        return value

    def obj(self, key: str, default=...) -> _Fields | None:
        value = self.raw(key, default)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(key, f"expected an object, found {type(value).__name__}")
        return _Fields(value, self.source, f"{self._where(key)}.")

    def check_no_unknown(self, extra_ok: tuple[str, ...] = ("extra",)) -> None:
        unknown = sorted(set(self.data) - self.used - set(extra_ok))
        if unknown:
            known = ", ".join(sorted(self.used))
            raise ProfileError(f"{self.source}: unknown field '{self.prefix}{unknown[0]}' "
                               f"(known here: {known}; put free-form data under 'extra')")


def _check_schema(f: _Fields, schema: str, versions: tuple[int, ...] = (SCHEMA_VERSION,)) -> int:
    found = f.text("schema")
    if found != schema:
        raise f.fail("schema", f"expected {schema!r}, found {found!r}")
    version = f.integer("schema_version", minimum=1)
    if version not in versions:
        readable = " or ".join(map(str, versions))
        raise f.fail("schema_version", f"this prima-plan reads version {readable}, "
                     f"found {version}; re-run profile-tool or update prima-ref")
    return version


def _throughputs(f: _Fields, key: str) -> dict[str, Throughput]:
    table = f.obj(key)
    out = {}
    for qtype in list(table.data):
        entry = table.obj(qtype)
        out[qtype] = Throughput(gbps=entry.num("gbps", positive=True),
                                gflops=entry.num("gflops", positive=True))
        entry.check_no_unknown(())
    if not out:
        raise f.fail(key, "empty: give at least one quant type or a 'default' entry")
    return out


def _number_table(f: _Fields, key: str) -> dict[str, float]:
    table = f.obj(key)
    return {qtype: table.num(qtype) for qtype in list(table.data)}


# ---------------------------------------------------------------------------------------------
# Device profiles


def device_from_dict(data: dict, source: str) -> DeviceProfile:
    f = _Fields(data, source)
    version = _check_schema(f, DEVICE_SCHEMA, DEVICE_SCHEMA_VERSIONS)
    name = f.text("name")
    os_name = f.text("os", choices=OS_NAMES)
    cpu, mem, disk, net = f.obj("cpu"), f.obj("memory"), f.obj("disk"), f.obj("network")
    device = DeviceProfile(
        name=name, host=f.text("host", name), os=os_name,
        cpu_name=cpu.text("name", "unknown"), cpu_cores=cpu.integer("cores", minimum=1),
        cpu_matvec=_throughputs(cpu, "matvec"),
        kv_copy_ms_per_layer=cpu.num("kv_copy_ms_per_layer", 0.0),
        memory=_memory(mem), disk=_disk(disk), network=_network(net),
        gpu=_gpu(f.obj("gpu", None), os_name), source=source,
        decode=_decode(cpu) if version >= 2 else (),
        ring=_ring(f.obj("ring", None)) if version >= 3 else None)
    for part in (cpu, mem, disk, net, f):
        part.check_no_unknown()
    return device


def _ring(f: _Fields | None) -> RingCost | None:
    if f is None:
        return None
    ring = RingCost(window_ms=f.num("window_ms"), round_ms=f.num("round_ms"),
                    n_embd=f.integer("n_embd", minimum=1), model=f.text("model", None) or "")
    f.raw("n_threads", None)
    f.check_no_unknown()
    return ring


def _decode(cpu: _Fields) -> tuple[DecodeCost, ...]:
    entries = cpu.raw("decode", [])
    if not isinstance(entries, list):
        raise cpu.fail("decode", "expected a list of per-model decode entries")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise cpu.fail(f"decode[{i}]", "expected an object")
        e = _Fields(entry, cpu.source, f"{cpu.prefix}decode[{i}].")
        out.append(DecodeCost(model=e.text("model"), n_layers=e.integer("n_layers", minimum=1),
                              layer_bytes=e.num("layer_bytes", positive=True),
                              layer_ms=e.num("layer_ms", positive=True),
                              fixed_ms=e.num("fixed_ms"), n_ctx=e.integer("n_ctx", minimum=1),
                              n_threads=e.integer("n_threads", minimum=1)))
        e.check_no_unknown()
    return tuple(out)


def _memory(f: _Fields) -> Memory:
    memory = Memory(total_gib=f.num("total_gib", positive=True),
                    available_gib=f.num("available_gib"),
                    read_gbps=f.num("read_gbps", positive=True),
                    swap_total_gib=f.num("swap_total_gib", 0.0),
                    swappable_gib=f.num("swappable_gib", 0.0),
                    page_cache_gib=f.num("page_cache_gib", 0.0),
                    cgroup_limit_gib=f.num("cgroup_limit_gib", None))
    if memory.available_gib > memory.total_gib:
        raise f.fail("available_gib", f"{memory.available_gib} GiB available exceeds "
                     f"total_gib {memory.total_gib}")
    return memory


def _disk(f: _Fields) -> Disk:
    return Disk(seq_read_gbps=f.num("seq_read_gbps", positive=True),
                rnd_read_gbps=f.num("rnd_read_gbps", positive=True),
                free_gib=f.num("free_gib"))


def _network(f: _Fields) -> Network:
    return Network(latency_ms=f.num("latency_ms"), bandwidth_gbps=f.num("bandwidth_gbps",
                                                                        positive=True))


def _gpu(f: _Fields | None, os_name: str) -> Gpu | None:
    if f is None:
        return None
    gpu = Gpu(name=f.text("name", "gpu"), is_cuda=f.flag("is_cuda", False),
              has_metal=f.flag("has_metal", False),
              vram_total_gib=f.num("vram_total_gib", positive=True),
              vram_free_gib=f.num("vram_free_gib"),
              bandwidth_gbps=f.num("bandwidth_gbps", positive=True),
              matvec=_throughputs(f, "matvec"),
              kv_copy_ms_per_layer=f.num("kv_copy_ms_per_layer", 0.0))
    f.check_no_unknown()
    if gpu.is_cuda == gpu.has_metal:
        raise f.fail("is_cuda", "exactly one of is_cuda and has_metal must be true "
                     "(leave 'gpu' out or null for a device without a usable GPU)")
    if gpu.has_metal and os_name != "macos":
        raise f.fail("has_metal", f"Metal needs os 'macos', this device is {os_name!r}")
    if gpu.is_cuda and os_name not in ("linux", "windows"):
        raise f.fail("is_cuda", f"CUDA needs os 'linux' or 'windows', found {os_name!r}")
    if gpu.vram_free_gib > gpu.vram_total_gib:
        raise f.fail("vram_free_gib", f"{gpu.vram_free_gib} exceeds vram_total_gib "
                     f"{gpu.vram_total_gib}")
    return gpu


# ---------------------------------------------------------------------------------------------
# What-if clusters: one short entry per device


def cluster_from_dict(data: dict, source: str) -> list[DeviceProfile]:
    f = _Fields(data, source)
    _check_schema(f, CLUSTER_SCHEMA)
    entries = f.raw("devices")
    if not isinstance(entries, list) or not entries:
        raise f.fail("devices", "expected a non-empty list of devices")
    f.check_no_unknown(("extra", "name", "description"))
    devices = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise f.fail(f"devices[{i}]", "expected an object")
        devices.append(_whatif_device(_Fields(entry, source, f"devices[{i}]."), source))
    return devices


def _whatif_device(f: _Fields, source: str) -> DeviceProfile:
    name = f.text("name")
    os_name = f.text("os", choices=OS_NAMES)
    avail = f.num("ram_avail_gib")
    ram_bw = f.num("ram_read_gbps", positive=True)
    device = DeviceProfile(
        name=name, host=f.text("host", name), os=os_name, cpu_name=f.text("cpu_name", "unknown"),
        cpu_cores=f.integer("cpu_cores", minimum=1), cpu_matvec=_whatif_matvec(f, "cpu"),
        kv_copy_ms_per_layer=f.num("kv_copy_ms_per_layer", 0.0),
        memory=Memory(total_gib=f.num("ram_total_gib", max(avail, 1e-9), positive=True),
                      available_gib=avail, read_gbps=ram_bw,
                      swappable_gib=f.num("swappable_gib", 0.0)),
        disk=Disk(seq_read_gbps=f.num("disk_seq_gbps", positive=True),
                  rnd_read_gbps=f.num("disk_rnd_gbps", positive=True),
                  free_gib=f.num("disk_free_gib", 64.0)),
        network=Network(latency_ms=f.num("link_latency_ms"),
                        bandwidth_gbps=f.num("link_gbps", positive=True)),
        gpu=_whatif_gpu(f.obj("gpu", None), os_name), source=source, ring=_whatif_ring(f))
    f.check_no_unknown()
    return device


def _whatif_ring(f: _Fields) -> RingCost | None:
    """`ring_window_ms` / `ring_round_ms`: the ring runtime's CPU work (device profile `ring`)."""
    window, rnd = f.num("ring_window_ms", None), f.num("ring_round_ms", None)
    if window is None and rnd is None:
        return None
    return RingCost(window_ms=window or 0.0, round_ms=rnd or 0.0)


def _whatif_matvec(f: _Fields, prefix: str) -> dict[str, Throughput]:
    """Either `{prefix}_gbps` + `{prefix}_gflops` for every type, or a `{prefix}_matvec` table."""
    if f.raw(f"{prefix}_matvec", None) is not None:
        return _throughputs(f, f"{prefix}_matvec")
    return {DEFAULT_QTYPE: Throughput(gbps=f.num(f"{prefix}_gbps", positive=True),
                                      gflops=f.num(f"{prefix}_gflops", positive=True))}


def _whatif_gpu(f: _Fields | None, os_name: str) -> Gpu | None:
    if f is None:
        return None
    kind = f.text("kind", choices=("cuda", "metal"))
    free = f.num("vram_free_gib")
    data = {"name": f.text("name", kind), "is_cuda": kind == "cuda", "has_metal": kind == "metal",
            "vram_total_gib": f.num("vram_total_gib", max(free, 1e-9), positive=True),
            "vram_free_gib": free, "bandwidth_gbps": f.num("bandwidth_gbps", positive=True),
            "matvec": {}}
    matvec = _whatif_matvec(f, "gpu")
    data["kv_copy_ms_per_layer"] = f.num("kv_copy_ms_per_layer", 0.0)
    f.check_no_unknown()
    data["matvec"] = {q: {"gbps": t.gbps, "gflops": t.gflops} for q, t in matvec.items()}
    return _gpu(_Fields(data, f.source, f.prefix), os_name)


# ---------------------------------------------------------------------------------------------
# Model profiles


def model_from_dict(data: dict, source: str) -> ModelProfile:
    f = _Fields(data, source)
    _check_schema(f, MODEL_SCHEMA)
    model = ModelProfile(
        name=f.text("name"), arch=f.text("arch", "unknown"),
        n_layers=f.integer("n_layers", minimum=1), n_embd=f.integer("n_embd", minimum=1),
        n_ff=f.integer("n_ff", minimum=1), n_head=f.integer("n_head", minimum=1),
        n_head_kv=f.integer("n_head_kv", minimum=1), head_dim=f.integer("head_dim", minimum=1),
        n_vocab=f.integer("n_vocab", minimum=1),
        layer=_group(f, "layer"), input=_group(f, "input"), output=_group(f, "output"),
        kv_bytes_per_token_per_layer=f.num("kv_bytes_per_token_per_layer"),
        attn_flops_per_token_per_ctx_per_layer=f.num("attn_flops_per_token_per_ctx_per_layer"),
        file=f.text("file", None), sha256=f.text("sha256", None), source=source)
    f.check_no_unknown(("extra", "total_bytes"))
    if model.layer.n_bytes <= 0:
        raise f.fail("layer.bytes_by_type", "a layer must have a positive number of bytes")
    return model


def _group(f: _Fields, key: str) -> TensorGroup:
    g = f.obj(key)
    group = TensorGroup(bytes_by_type=_number_table(g, "bytes_by_type"),
                        flops_by_type=_number_table(g, "flops_by_type"))
    g.check_no_unknown(("extra", "bytes"))
    return group


def model_to_dict(model: ModelProfile) -> dict:
    def group(g: TensorGroup) -> dict:
        return {"bytes": g.n_bytes, "bytes_by_type": g.bytes_by_type,
                "flops_by_type": g.flops_by_type}

    return {"schema": MODEL_SCHEMA, "schema_version": SCHEMA_VERSION, "name": model.name,
            "arch": model.arch, "file": model.file, "sha256": model.sha256,
            "n_layers": model.n_layers, "n_embd": model.n_embd, "n_ff": model.n_ff,
            "n_head": model.n_head, "n_head_kv": model.n_head_kv, "head_dim": model.head_dim,
            "n_vocab": model.n_vocab, "total_bytes": model.total_bytes,
            "kv_bytes_per_token_per_layer": model.kv_bytes_per_token_per_layer,
            "attn_flops_per_token_per_ctx_per_layer":
                model.attn_flops_per_token_per_ctx_per_layer,
            "layer": group(model.layer), "input": group(model.input),
            "output": group(model.output)}


# ---------------------------------------------------------------------------------------------
# Files


def read_document(path: Path) -> dict:
    """A JSON or TOML file as a dict; errors name the file and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: cannot read: {e}") from None
    if path.suffix.lower() == ".toml":
        data = _parse_toml(path, text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} "
                               f"column {e.colno}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a JSON object at the top level")
    return data


def _parse_toml(path: Path, text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ProfileError(f"{path}: reading TOML needs Python 3.11+ or the 'tomli' "
                               "package; or write the cluster as JSON") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from None


def load_devices(paths: list[str | os.PathLike]) -> list[DeviceProfile]:
    """Devices in ring order (the first is rank 0) from profile files, folders or cluster files.

    A folder contributes its *.json / *.toml files in name order.
    """
    devices: list[DeviceProfile] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".json", ".toml"))
            if not files:
                raise ProfileError(f"{path}: folder holds no .json or .toml device profiles")
        elif path.exists():
            files = [path]
        else:
            raise ProfileError(f"{path}: no such file or folder")
        for file in files:
            devices.extend(_devices_in(file))
    _check_unique_names(devices)
    return devices


def _devices_in(path: Path) -> list[DeviceProfile]:
    data = read_document(path)
    schema = data.get("schema")
    if schema == CLUSTER_SCHEMA:
        return cluster_from_dict(data, str(path))
    if schema == DEVICE_SCHEMA:
        return [device_from_dict(data, str(path))]
    raise ProfileError(f"{path}: field 'schema': expected {DEVICE_SCHEMA!r} or "
                       f"{CLUSTER_SCHEMA!r}, found {schema!r}")


def _check_unique_names(devices: list[DeviceProfile]) -> None:
    seen: dict[str, str] = {}
    for d in devices:
        if d.name in seen:
            raise ProfileError(f"{d.source}: field 'name': device {d.name!r} already given in "
                               f"{seen[d.name]}; device names must be unique")
        seen[d.name] = d.source


def load_model_profile(path: str | os.PathLike) -> ModelProfile:
    path = Path(path)
    return model_from_dict(read_document(path), str(path))
