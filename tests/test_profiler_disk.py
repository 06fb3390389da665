"""Disk reads with the page cache bypassed: the O_DIRECT path always, fio when installed, and
temporary files that never outlive a run, even an interrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from profiler import disk

TOOL = [sys.executable, "-m", "profiler.cli"]


@pytest.fixture
def target(tmp_path):
    return disk.disk_target(tmp_path)


def _buffered_random_read_gbps(path: Path, seconds: float = 0.2) -> float:
    """4 KiB random reads through the page cache, the file read once first so it is hot."""
    import random

    path.read_bytes()
    size, rng, n = path.stat().st_size, random.Random(1), 0
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            n += len(os.pread(fd, 4096, rng.randrange(size // 4096) * 4096))
    finally:
        os.close(fd)
    return n / (time.perf_counter() - t0) / 1e9


def test_read_ahead_and_page_size_come_from_the_models_disk(target):
    assert target.page_bytes == os.sysconf("SC_PAGE_SIZE")
    assert target.read_ahead_kib > 0 and target.free_gib > 0
    if target.device != "unknown":
        ra = Path(target.read_ahead_source).read_text()
        assert int(ra) == target.read_ahead_kib


def test_odirect_reads_bypass_the_page_cache(target, tmp_path):
    with disk.test_file(target, 64 << 20, None) as (path, kind, write_gbps):
        assert kind == "temporary" and path.parent == tmp_path and write_gbps > 0
        method, seq, rnd = disk.odirect_reads(path, target, repeats=3, seconds=0.1)
        cached_rnd = _buffered_random_read_gbps(path)
    assert method == "odirect"
    assert seq.mean > 0 and rnd.mean > 0
    assert seq.mean > rnd.mean  # read-ahead-sized blocks against one page at a time
    # from the page cache the same 4 KiB reads are many times faster: ours did not hit it
    assert rnd.mean < cached_rnd / 2
    assert list(tmp_path.iterdir()) == []


def test_fio_and_odirect_figures_agree_within_2x(target, tmp_path):
    fio = disk.fio_binary()
    if fio is None:
        pytest.skip("fio is not installed (apt-get install fio); the O_DIRECT path is tested "
                    "on its own above")
    with disk.test_file(target, 128 << 20, None) as (path, _, _):
        _, seq_py, rnd_py = disk.odirect_reads(path, target, repeats=3, seconds=0.25)
        method, seq_fio, rnd_fio = disk.fio_reads(path, target, repeats=3, seconds=0.25,
                                                  fio=fio)
    assert method == "fio"
    assert seq_fio.mean / 2 < seq_py.mean < seq_fio.mean * 2
    assert rnd_fio.mean / 2 < rnd_py.mean < rnd_fio.mean * 2
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_falls_back_to_reading_the_model_read_only(smollm2_path, tmp_path):
    missing = disk.DiskTarget(tmp_path / "gone", "unknown", 128, "default", 4096, 10.0)
    before = os.stat(smollm2_path).st_mtime_ns
    notes = []
    with disk.test_file(missing, 64 << 20, Path(smollm2_path), notes.append) as (path, kind, _):
        assert kind == "model (read-only)" and path == Path(smollm2_path)
        _, seq, rnd = disk.odirect_reads(path, missing, repeats=1, seconds=0.05)
    assert seq.mean > 0 and rnd.mean > 0 and "read-only" in notes[0]
    assert os.stat(smollm2_path).st_mtime_ns == before


def test_temp_file_is_removed_when_an_exception_escapes(target, tmp_path):
    with pytest.raises(RuntimeError), disk.test_file(target, 8 << 20, None) as (path, _, _):
        assert path.exists()
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_file_left_by_a_killed_run_is_removed_by_the_next(target, tmp_path):
    no_such_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    stale = tmp_path / f"{disk.TEMP_PREFIX}{no_such_pid}.tmp"  # SIGKILL: nobody cleaned up
    alive = tmp_path / f"{disk.TEMP_PREFIX}1.tmp"  # pid 1 runs: another profile-tool's file
    stale.write_bytes(b"x")
    alive.write_bytes(b"y")
    with disk.test_file(target, 8 << 20, None):
        pass
    assert [p.name for p in tmp_path.iterdir()] == [alive.name]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_removes_its_temporary_file(smollm2_path, tmp_path, sig):
    proc = subprocess.Popen(TOOL + ["-m", str(smollm2_path), "--quick", "--no-fio", "-r", "20",
                                    "--no-gpu", "--disk-dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(f"{disk.TEMP_PREFIX}*")):
            assert proc.poll() is None and time.monotonic() < deadline, "no temp file seen"
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (130 if sig == signal.SIGINT else 128 + sig), err
    assert list(tmp_path.iterdir()) == []
