"""What the OS says about this device: OS, CPU, memory, cgroup limits, memory pressure.

Nothing here is timed; the figures come from /proc, /sys and (macOS) sysctl/vm_stat.

Available memory is defined as what an inference process started *in place of* profile-tool
could take without the OS swapping or reclaiming anonymous memory:

    host      MemAvailable + profile-tool's own anonymous memory (it goes when we exit)
    cgroup    for our cgroup and every ancestor with a limit (v1 memory.limit_in_bytes,
              v2 memory.max): limit - (usage - file cache - profile-tool's anonymous memory);
              file cache (the model's pages among them) is reclaimable, as MemAvailable counts
              it on the host
    reported  the smallest of these

So a fresh process in a cgroup with a 1 GiB limit reports ~1 GiB available (less the cgroup's
kernel memory), and a container whose other processes hold 300 MiB reports 724 MiB.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1 << 30
_UNLIMITED_BYTES = 1 << 60  # cgroup v1 writes "no limit" as PAGE_COUNTER_MAX * page size


# ---------------------------------------------------------------------------------------------
# OS and CPU


def detect_os() -> str:
    """'linux', 'android' (Termux or any Android userland), 'macos' or 'windows'."""
    system = platform.system()
    if system == "Darwin":
        return "macos"
    if system == "Windows":
        return "windows"
    if system == "Linux" and _is_android():
        return "android"
    return "linux"


def _is_android() -> bool:
    # prima.cpp's check is $TERMUX_VERSION; ANDROID_ROOT is set for every Android process
    return bool(os.environ.get("TERMUX_VERSION") or os.environ.get("ANDROID_ROOT")
                or Path("/system/build.prop").exists())


def cpu_name() -> str:
    if platform.system() == "Darwin":
        return _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or platform.machine()
    info = _read("/proc/cpuinfo")
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", info, re.MULTILINE)
        if match and match.group(1).strip():
            return match.group(1).strip()
    model = _read("/sys/firmware/devicetree/base/model").strip("\x00\n ")
    if model:
        return model
    soc = _run(["getprop", "ro.soc.model"]) if _is_android() else ""
    return soc or platform.processor() or platform.machine() or "unknown"


@dataclass(frozen=True)
class CpuCores:
    usable: int  # what a process here can run on: affinity, capped by a cgroup CPU quota
    logical: int
    affinity: int
    quota_cores: float | None  # cgroup cpu.max / cfs_quota_us, when set


def cpu_cores() -> CpuCores:
    logical = os.cpu_count() or 1
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = logical
    quota = _cpu_quota_cores()
    usable = affinity if quota is None else max(1, min(affinity, int(quota + 0.999)))
    return CpuCores(usable=usable, logical=logical, affinity=affinity, quota_cores=quota)


def _cpu_quota_cores() -> float | None:
    for group in cgroup_dirs("cpu"):
        if group.version == 2:
            parts = _read(group.path / "cpu.max").split()
            if len(parts) == 2 and parts[0] != "max":
                return int(parts[0]) / int(parts[1])
        else:
            quota = _read_int(group.path / "cpu.cfs_quota_us")
            period = _read_int(group.path / "cpu.cfs_period_us")
            if quota and quota > 0 and period:
                return quota / period
    return None


@dataclass(frozen=True)
class CpuTimes:
    all_busy_s: float  # every CPU's non-idle time since boot (/proc/stat)
    all_total_s: float
    own_s: float  # this process and its finished children (fio)


def cpu_times() -> CpuTimes | None:
    fields = _read("/proc/stat").split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    hz = os.sysconf("SC_CLK_TCK")
    t = os.times()
    return CpuTimes(all_busy_s=(sum(ticks) - ticks[3] - ticks[4]) / hz,
                    all_total_s=sum(ticks) / hz,
                    own_s=t.user + t.system + t.children_user + t.children_system)


def others_busy_pct(start: CpuTimes | None, end: CpuTimes | None) -> float | None:
    """Share of all CPUs that other processes used between two snapshots, in percent.

    Numba's parallel kernels wait at a barrier for their slowest thread, so a core taken by
    another process costs a scheduler time slice per matvec: figures measured on a busy device
    can be many times too low. The run records this so that a reader can tell.
    """
    if start is None or end is None or end.all_total_s <= start.all_total_s:
        return None
    others = (end.all_busy_s - start.all_busy_s) - (end.own_s - start.own_s)
    return max(0.0, min(100.0, 100 * others / (end.all_total_s - start.all_total_s)))


# ---------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class CgroupLevel:
    version: int
    path: str  # inside the hierarchy, "/" at its root
    limit_bytes: int | None
    usage_bytes: int
    file_bytes: int  # page cache charged to this cgroup (reclaimable)
    swap_limit_bytes: int | None = None


@dataclass(frozen=True)
class MemoryInfo:
    total_gib: float
    available_gib: float  # see the module docstring
    host_available_gib: float  # MemAvailable alone
    own_anon_gib: float
    swap_total_gib: float
    swap_free_gib: float
    swappable_gib: float
    page_cache_gib: float
    cgroup_limit_gib: float | None  # the tightest limit on us
    cgroups: list[CgroupLevel] = field(default_factory=list)
    pressure: dict = field(default_factory=dict)  # PSI averages, or why there are none
    source: str = "/proc/meminfo"


def memory_info(os_name: str) -> MemoryInfo:
    if os_name == "macos":
        return _memory_macos()
    meminfo = _meminfo()
    own_anon = _own_anon_bytes()
    host_avail = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
    avail = host_avail + own_anon
    levels = [level for level in _memory_cgroups()]
    limited = [lv for lv in levels if lv.limit_bytes is not None]
    for lv in limited:
        others = max(0, lv.usage_bytes - lv.file_bytes - own_anon)
        avail = min(avail, max(0, lv.limit_bytes - others))
    total = meminfo.get("MemTotal", 0)
    swap_free = meminfo.get("SwapFree", 0)
    # Android swaps anonymous pages (zram) before it drops the model's mmap pages
    swappable = 0
    if os_name == "android":
        anon = meminfo.get("AnonPages", 0) - meminfo.get("Mlocked", 0)
        swappable = max(0, min(anon, swap_free))
    cache = meminfo.get("Cached", 0) + meminfo.get("Buffers", 0) - meminfo.get("Shmem", 0)
    limit = min((lv.limit_bytes for lv in limited), default=None)
    return MemoryInfo(
        total_gib=total / GIB, available_gib=min(avail, total) / GIB,
        host_available_gib=host_avail / GIB, own_anon_gib=own_anon / GIB,
        swap_total_gib=meminfo.get("SwapTotal", 0) / GIB, swap_free_gib=swap_free / GIB,
        swappable_gib=swappable / GIB, page_cache_gib=max(0, cache) / GIB,
        cgroup_limit_gib=None if limit is None else limit / GIB, cgroups=levels,
        pressure=memory_pressure(levels))


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    for line in _read("/proc/meminfo").splitlines():
        match = re.match(r"^(\w+(?:\(\w+\))?):\s+(\d+)(?:\s+kB)?", line)
        if match:
            scale = 1024 if line.rstrip().endswith("kB") else 1
            out[match.group(1)] = int(match.group(2)) * scale
    return out


def _own_anon_bytes() -> int:
    match = re.search(r"^RssAnon:\s+(\d+)\s+kB", _read("/proc/self/status"), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def memory_pressure(levels: list[CgroupLevel]) -> dict:
    """PSI averages in percent of wall time (some = at least one task stalled on memory)."""
    text = _read("/proc/pressure/memory")
    source = "/proc/pressure/memory"
    v2 = [d for d in cgroup_dirs("memory") if d.version == 2]
    if v2 and _read(v2[0].path / "memory.pressure"):
        text, source = _read(v2[0].path / "memory.pressure"), str(v2[0].path / "memory.pressure")
    out: dict = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key.startswith("avg"):
                out[f"{kind}_{key}_pct"] = float(value)
    if not out:
        return {"available": False,
                "reason": "kernel without PSI (/proc/pressure/memory missing or unreadable)"}
    return {"available": True, "source": source, **out}


def _memory_macos() -> MemoryInfo:
    total = int(_run(["sysctl", "-n", "hw.memsize"]) or 0)
    page = int(_run(["sysctl", "-n", "hw.pagesize"]) or 4096)
    stats = {}
    for line in _run(["vm_stat"]).splitlines():
        match = re.match(r"^Pages ([\w -]+):\s+(\d+)", line)
        if match:
            stats[match.group(1)] = int(match.group(2)) * page
    # prima.cpp's reading: free + inactive + purgeable + speculative can be had without swapping
    avail = sum(stats.get(k, 0) for k in ("free", "inactive", "purgeable", "speculative"))
    swap = re.findall(r"(total|free) = ([\d.]+)M", _run(["sysctl", "-n", "vm.swapusage"]))
    swap_mib = {k: float(v) for k, v in swap}
    return MemoryInfo(
        total_gib=total / GIB, available_gib=min(avail, total) / GIB,
        host_available_gib=avail / GIB, own_anon_gib=0.0,
        swap_total_gib=swap_mib.get("total", 0) / 1024,
        swap_free_gib=swap_mib.get("free", 0) / 1024,
        swappable_gib=0.0, page_cache_gib=stats.get("inactive", 0) / GIB, cgroup_limit_gib=None,
        pressure={"available": False, "reason": "macOS has no PSI"}, source="vm_stat")


# ---------------------------------------------------------------------------------------------
# cgroups (v1 and v2)


@dataclass(frozen=True)
class CgroupDir:
    version: int
    path: Path  # a directory under the mounted hierarchy
    rel: str  # the cgroup path inside the hierarchy


def cgroup_dirs(controller: str) -> list[CgroupDir]:
    """Our cgroup and its ancestors up to the mount's root, innermost first, for a controller.

    A v1 hierarchy that carries the controller wins; otherwise the v2 (unified) hierarchy, if
    the controller is enabled there (in hybrid mode it usually is not).
    """
    mounts = _cgroup_mounts()
    lines = [(line.split(":", 2) + ["", ""])[:3]
             for line in _read("/proc/self/cgroup").splitlines()]
    for hid, controllers, rel in lines:
        if hid != "0" and controller in controllers.split(",") and controller in mounts:
            return _ancestors(1, *mounts[controller], rel)
    for hid, controllers, rel in lines:
        if hid == "0" and controllers == "" and "cgroup2" in mounts:
            point, root = mounts["cgroup2"]
            if controller in _read(point / "cgroup.controllers").split():
                return _ancestors(2, point, root, rel)[:-1]  # the v2 root has no limits
    return []


def _ancestors(version: int, mount_point: Path, mount_root: str, rel: str) -> list[CgroupDir]:
    inside = rel[len(mount_root):] if rel.startswith(mount_root) else rel
    parts = [p for p in inside.split("/") if p]
    out = []
    for depth in range(len(parts), -1, -1):
        directory = mount_point.joinpath(*parts[:depth])
        if directory.is_dir():
            out.append(CgroupDir(version, directory, "/" + "/".join(parts[:depth])))
    return out


def _cgroup_mounts() -> dict[str, tuple[Path, str]]:
    """controller name (or 'cgroup2') -> (mount point, root inside the hierarchy)."""
    mounts: dict[str, tuple[Path, str]] = {}
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        root, point, fstype = fields[3], Path(fields[4].replace("\\040", " ")), rfields[0]
        if fstype == "cgroup2":
            mounts.setdefault("cgroup2", (point, root))
        elif fstype == "cgroup":
            for opt in rfields[2].split(","):
                mounts.setdefault(opt, (point, root))
    return mounts


def _memory_cgroups() -> list[CgroupLevel]:
    levels = []
    for d in cgroup_dirs("memory"):
        if d.version == 1:
            limit = _read_int(d.path / "memory.limit_in_bytes")
            usage = _read_int(d.path / "memory.usage_in_bytes") or 0
            stat = _kv(d.path / "memory.stat")
            file_bytes = stat.get("total_cache", stat.get("cache", 0))
            swap = _read_int(d.path / "memory.memsw.limit_in_bytes")
        else:
            limit = _read_int(d.path / "memory.max")
            usage = _read_int(d.path / "memory.current") or 0
            file_bytes = _kv(d.path / "memory.stat").get("file", 0)
            swap = _read_int(d.path / "memory.swap.max")
        if limit is None and usage == 0:
            continue  # a hierarchy level without memory accounting
        levels.append(CgroupLevel(
            version=d.version, path=d.rel, limit_bytes=_limit(limit), usage_bytes=usage,
            file_bytes=file_bytes, swap_limit_bytes=_limit(swap)))
    return levels


def _limit(value: int | None) -> int | None:
    return None if value is None or value >= _UNLIMITED_BYTES else value


# ---------------------------------------------------------------------------------------------
# Small readers: a missing file is an empty answer, never an exception


def _read(path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _read_int(path) -> int | None:
    text = _read(path).strip()
    return int(text) if text.isdigit() else None  # "max" (v2) and "" are no limit


def _kv(path) -> dict[str, int]:
    out = {}
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
