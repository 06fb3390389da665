"""Prefetch and release of a rank's weight windows, and the memory numbers that judge them.

After a rank computes window r it advises the OS to read window r+1 (`madvise(MADV_WILLNEED)`
on the file map, prima.cpp's --prefetch); --force touches one byte per page in a background
thread instead of leaving the read to the OS. With --release, a finished window is dropped
from this process's map (`MADV_DONTNEED`) and from the page cache (`POSIX_FADV_DONTNEED`) when
the rank's share of the weights exceeds its free memory, so the cache holds the next window
rather than the last one. Weights stay in the page cache, never in anonymous memory.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
from pathlib import Path

import numpy as np

PAGE = mmap.PAGESIZE


def window_ranges(gguf, windows: list[list[int]]) -> list[list[tuple[int, int]]]:
    """Per window, the page-aligned [start, end) byte ranges of its layers' tensors, merged
    where they touch (files often order layers 0, 1, 10, 11, ..., so a window is not one run)."""
    ranges = gguf.layer_ranges()
    out = []
    for window in windows:
        spans = sorted((ranges[il][0] // PAGE * PAGE, min(-(-ranges[il][1] // PAGE) * PAGE, gguf.file_size))
                       for il in window)
        merged: list[tuple[int, int]] = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        out.append(merged)
    return out


class WindowPager:
    def __init__(self, gguf, windows: list[list[int]], *, prefetch: bool, force: bool,
                 release: str | None):
        self.map = gguf._mm  # the one map every weight view points into (GGUFModel's own)
        self.fd = os.open(gguf.path, os.O_RDONLY)
        self.ranges = window_ranges(gguf, windows)
        self.prefetch, self.force = prefetch or force, force
        share = sum(e - s for spans in self.ranges for s, e in spans)
        free = free_memory_bytes()
        self.share_bytes, self.free_bytes = share, free
        self.release = len(windows) > 1 and (release == "always" or (release == "auto" and share > free))
        self.touch_queue: queue.Queue | None = None
        if self.force:
            self.touch_queue = queue.Queue()
            threading.Thread(target=self._toucher, name="ring-touch", daemon=True).start()

    def after_compute(self, r: int) -> None:
        """Window r is done: release it if asked, and start reading the next one."""
        k = len(self.ranges)
        if self.release:
            for s, e in self.ranges[r]:
                self.map.madvise(mmap.MADV_DONTNEED, s, e - s)
                os.posix_fadvise(self.fd, s, e - s, os.POSIX_FADV_DONTNEED)
        if self.prefetch:
            nxt = self.ranges[(r + 1) % k]
            for s, e in nxt:
                self.map.madvise(mmap.MADV_WILLNEED, s, e - s)
            if self.touch_queue is not None:
                self.touch_queue.put(nxt)

    def _toucher(self) -> None:
        while True:
            for s, e in self.touch_queue.get():
                pages = np.frombuffer(self.map, dtype=np.uint8, count=e - s, offset=s)[::PAGE]
                int(pages.sum())  # one byte per page: the OS reads each page now
                del pages

    def close(self) -> None:
        os.close(self.fd)


# ---------------------------------------------------------------------------------------------
# Memory numbers


def proc_status_bytes(field: str) -> int:
    """A field of /proc/self/status in bytes (RssAnon, RssFile, VmHWM, ...); 0 where absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def anon_rss_bytes() -> int:
    """Anonymous resident memory (RssAnon) from /proc/self/statm: resident minus file-backed
    and shared pages. The worker samples it once per window, so it reads statm, half the cost
    of parsing /proc/self/status (0.1-0.2 ms a call on a loaded 2-core VM)."""
    try:
        fields = Path("/proc/self/statm").read_bytes().split()
        return (int(fields[1]) - int(fields[2])) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def cgroup_v1_memory() -> tuple[int, int] | None:
    """(limit, usage) bytes of this process's cgroup v1 memory controller, None without one."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
                limit = int((base / "memory.limit_in_bytes").read_text())
                usage = int((base / "memory.usage_in_bytes").read_text())
                return limit, usage
    except (OSError, ValueError):
        pass
    return None


def free_memory_bytes() -> int:
    """MemAvailable, or less where a cgroup limit leaves less."""
    free = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    cg = cgroup_v1_memory()
    if cg and cg[0] < 1 << 60:
        free = min(free or cg[0], max(0, cg[0] - cg[1]))
    return free


def mapped_file_rss_bytes(path) -> int:
    """Resident bytes of this process's maps of `path` (from /proc/self/smaps)."""
    target = str(Path(path).resolve())
    total, inside = 0, False
    try:
        for line in Path("/proc/self/smaps").read_text().splitlines():
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5 and ":" not in parts[0]:
                inside = len(parts) >= 6 and parts[-1] == target
            elif inside and parts and parts[0] == "Rss:":
                total += int(parts[1]) * 1024
    except OSError:
        pass
    return total
