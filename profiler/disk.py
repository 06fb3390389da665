"""Disk read speed on the disk that holds the model, with the page cache bypassed.

Two tests, as prima.cpp's fio jobs: sequential reads in blocks of the block device's read-ahead
size (what a page fault on an mmap with read-ahead fetches) and random reads in page-size blocks
(a fault without read-ahead). Both at queue depth 1 on one thread, as a decode thread faults.

Two ways to run them, with the same parameters:
- `odirect`: Python preadv on a file opened with O_DIRECT (macOS: F_NOCACHE), so every read
  goes to the device; if the file system refuses O_DIRECT, posix_fadvise(DONTNEED) before each
  sample (recorded as `fadvise`).
- `fio` (when the binary is installed): the same jobs with ioengine=psync, direct=1, read-only,
  its JSON output parsed (prima.cpp parses text and understands only MiB/s and MB/s).

The file read is a temporary file written next to the model (with O_DIRECT, so it is not left
in the page cache), never the model file itself, and removed on any exit: normal, exception,
Ctrl-C or SIGTERM (cli.py turns SIGTERM into SystemExit). If the model's folder is not
writable, the model file is read instead, opened read-only.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from profiler.stats import Stat

MIB = 1 << 20
DEFAULT_READ_AHEAD_KIB = 128  # Linux's default when the device cannot be found (overlay, tmpfs)
TEMP_PREFIX = ".profile-tool-"


@dataclass(frozen=True)
class DiskTarget:
    directory: Path
    device: str  # e.g. "vda", or "unknown"
    read_ahead_kib: int
    read_ahead_source: str
    page_bytes: int
    free_gib: float


@dataclass(frozen=True)
class DiskResult:
    method: str  # "fio", "odirect" or "fadvise"
    seq_read_gbps: Stat
    rnd_read_gbps: Stat
    file_bytes: int
    file_kind: str  # "temporary" or "model (read-only)"
    write_gbps: float | None  # writing the temporary file (O_DIRECT + fsync), if one was written


def disk_target(directory: Path) -> DiskTarget:
    st = os.stat(directory)
    device, ra_kib, source = _read_ahead(st.st_dev)
    usage = shutil.disk_usage(directory)
    return DiskTarget(directory=directory, device=device, read_ahead_kib=ra_kib,
                      read_ahead_source=source, page_bytes=mmap.PAGESIZE,
                      free_gib=usage.free / (1 << 30))


def _read_ahead(st_dev: int) -> tuple[str, int, str]:
    if sys.platform == "darwin":
        return "unknown", 1024, "macOS f_iosize default"
    disk = Path(f"/sys/dev/block/{os.major(st_dev)}:{os.minor(st_dev)}").resolve()
    if (disk / "partition").exists():
        disk = disk.parent  # a partition uses its disk's queue
    try:
        kib = int((disk / "queue" / "read_ahead_kb").read_text())
        if kib > 0:
            return disk.name, kib, str(disk / "queue" / "read_ahead_kb")
    except (OSError, ValueError):
        pass
    return "unknown", DEFAULT_READ_AHEAD_KIB, "default (no block device for this file system)"


# ---------------------------------------------------------------------------------------------
# The file to read


@contextlib.contextmanager
def test_file(target: DiskTarget, size_bytes: int, model_path: Path | None, log=print):
    """Yields (path, kind, write_gbps); a temporary file is removed whatever happens."""
    _remove_stale(target.directory)
    path = target.directory / f"{TEMP_PREFIX}{os.getpid()}.tmp"
    size_bytes = min(size_bytes, int(target.free_gib * (1 << 30) * 0.5)) // MIB * MIB
    try:
        try:
            if size_bytes < 4 * MIB:
                raise OSError(f"only {target.free_gib:.2f} GiB free")
            write_gbps = _write_file(path, size_bytes)
        except OSError as e:
            if model_path is None:
                raise
            log(f"cannot write a test file in {target.directory} ({e}); reading the model "
                f"file instead, read-only")
            _remove(path)
            path, write_gbps = None, None
        if path is None:
            yield model_path, "model (read-only)", None
        else:
            yield path, "temporary", write_gbps
    finally:
        if path is not None:
            _remove(path)


def _remove_stale(directory: Path) -> None:
    """Files left by a profile-tool that was killed (SIGKILL cannot be caught)."""
    for stale in directory.glob(f"{TEMP_PREFIX}*.tmp"):
        pid = stale.name[len(TEMP_PREFIX):-len(".tmp")]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and sys.platform == "linux":
            _remove(stale)


def _write_file(path: Path, size_bytes: int) -> float:
    chunk = 4 * MIB
    buf = mmap.mmap(-1, chunk)  # page aligned, as O_DIRECT needs
    buf.write(os.urandom(chunk))  # incompressible: no device may shortcut it
    view = memoryview(buf)
    fd, direct = _open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        t0 = time.perf_counter()
        for offset in range(0, size_bytes, chunk):
            os.pwrite(fd, view[:min(chunk, size_bytes - offset)], offset)
        os.fsync(fd)
        seconds = time.perf_counter() - t0
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
        view.release()
        buf.close()
    return size_bytes / seconds / 1e9


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _open(path: Path, flags: int) -> tuple[int, bool]:
    """(fd, True) with the page cache bypassed, or (fd, False) where the file system refuses."""
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o600), True
        except OSError as e:
            if e.errno != 22:  # EINVAL: this file system has no O_DIRECT
                raise
            flags &= ~os.O_EXCL  # the failed open may have created it
    fd = os.open(path, flags, 0o600)
    if sys.platform == "darwin":
        import fcntl

        fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
        return fd, True
    return fd, False


# ---------------------------------------------------------------------------------------------
# O_DIRECT reads in Python


def odirect_reads(path: Path, target: DiskTarget, *, repeats: int,
                  seconds: float) -> tuple[str, Stat, Stat]:
    """(method, sequential GB/s, random GB/s); each sample reads for `seconds`."""
    block_seq = target.read_ahead_kib * 1024
    block_rnd = target.page_bytes
    fd, direct = _open(path, os.O_RDONLY)
    buf = mmap.mmap(-1, max(block_seq, block_rnd))  # page aligned, as O_DIRECT needs
    view = memoryview(buf)
    try:
        size = os.fstat(fd).st_size // block_rnd * block_rnd
        if size < block_seq:
            raise OSError(f"{path}: {size} bytes is too small for a disk test")
        rng = random.Random(0)
        n_pages = size // block_rnd
        seq_pos = [0]

        def seq_sample() -> float:
            _drop_cache(fd, direct)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                if seq_pos[0] + block_seq > size:
                    seq_pos[0] = 0
                n += os.preadv(fd, [view[:block_seq]], seq_pos[0])
                seq_pos[0] += block_seq
            return n / (time.perf_counter() - t0) / 1e9

        def rnd_sample() -> float:
            _drop_cache(fd, direct)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                n += os.preadv(fd, [view[:block_rnd]], rng.randrange(n_pages) * block_rnd)
            return n / (time.perf_counter() - t0) / 1e9

        seq = Stat(tuple(seq_sample() for _ in range(repeats)))
        rnd = Stat(tuple(rnd_sample() for _ in range(repeats)))
    finally:
        os.close(fd)
        view.release()
        buf.close()
    return ("odirect" if direct else "fadvise"), seq, rnd


def _drop_cache(fd: int, direct: bool) -> None:
    if not direct and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


# ---------------------------------------------------------------------------------------------
# fio


def fio_binary() -> str | None:
    # prima.cpp adds Homebrew's folders, where fio lives on macOS, when they are not on PATH
    path = os.environ.get("PATH", "") + os.pathsep + "/opt/homebrew/bin:/usr/local/bin"
    return shutil.which("fio", path=path)


def fio_reads(path: Path, target: DiskTarget, *, repeats: int, seconds: float,
              fio: str) -> tuple[str, Stat, Stat]:
    """The same two tests run by fio: one process, 2 x repeats jobs one after another."""
    size = os.stat(path).st_size // target.page_bytes * target.page_bytes
    argv = [fio, "--output-format=json", "--readonly", "--direct=1", "--ioengine=psync",
            "--iodepth=1", "--numjobs=1", "--thread", f"--filename={path}", f"--size={size}",
            "--time_based", f"--runtime={max(1, int(seconds * 1000))}ms", "--randrepeat=0"]
    for i in range(repeats):
        argv += [f"--name=seq{i}", "--rw=read", f"--bs={target.read_ahead_kib}k",
                 "--stonewall"]
    for i in range(repeats):
        argv += [f"--name=rnd{i}", "--rw=randread", f"--bs={target.page_bytes}", "--stonewall"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=60 + 4 * repeats * seconds)
    finally:
        if proc.poll() is None:  # interrupted or timed out: do not leave fio behind
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"fio exited with {proc.returncode}: {err.strip()[-400:]}")
    jobs = json.loads(out[out.index("{"):])["jobs"]
    bw = {job["jobname"]: job["read"]["bw_bytes"] / 1e9 for job in jobs}
    seq = Stat(tuple(bw[f"seq{i}"] for i in range(repeats)))
    rnd = Stat(tuple(bw[f"rnd{i}"] for i in range(repeats)))
    return "fio", seq, rnd


# ---------------------------------------------------------------------------------------------
# Both tests on the model's disk


def measure_disk(target: DiskTarget, *, model_path: Path | None, size_bytes: int, repeats: int,
                 seconds: float, use_fio: bool, log=print) -> DiskResult:
    fio = fio_binary() if use_fio else None
    with test_file(target, size_bytes, model_path, log) as (path, kind, write_gbps):
        if fio:
            method, seq, rnd = fio_reads(path, target, repeats=repeats, seconds=seconds, fio=fio)
        else:
            method, seq, rnd = odirect_reads(path, target, repeats=repeats, seconds=seconds)
        file_bytes = os.stat(path).st_size
    return DiskResult(method=method, seq_read_gbps=seq, rnd_read_gbps=rnd,
                      file_bytes=file_bytes, file_kind=kind, write_gbps=write_gbps)
