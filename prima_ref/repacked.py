"""A repacked copy of a model's legacy-quant matrices, the bytes the decode kernels read fastest.

The lanes kernels read a 16-row group of a row-major matrix as 16 strided streams, which this
class of CPU reads from RAM at 76-95 % of a linear read; over ``lanes.repack``'s layout (each
group's blocks interleaved) the same kernels read one linear stream, 101-116 % (reports/
kernels.md). So the engine maps a copy of the GGUF file in which those matrices are repacked:

- the same size, header and tensor byte ranges as the source, so layer ranges, the ring's
  per-rank windows, prefetch, release and lazy loading work on it unchanged, and the weights
  stay file-backed in the page cache (never anonymous memory);
- filled lazily, tensor by tensor, for the layers (and the head) an opener asks for: a rank
  holding 10 of 80 layers writes those 10; the rest of the file is a hole, and reading a tensor
  there is an error, never zeros;
- kept under ``$PRIMA_REF_CACHE`` (default ~/.cache/prima-ref)/packed, one copy per source
  path, rebuilt when the source's size, mtime or header change; ``PRIMA_REF_REPACK=0`` (or
  ``--no-repack``) maps the source itself.

Repacked: the 2-D Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 products of each layer and output.weight whose rows
are whole 16-row groups; never token_embd (the embedding reads its rows). Each layer's kernels
give the same bits over either layout, so logits do not change. Only CPUs with the lanes
kernels (512-bit VNNI) read repacked bytes; elsewhere the source is mapped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from prima_ref.gguf_file import GGUFModel, TensorInfo
from prima_ref.quants import lanes
from prima_ref.quants.legacy import BLOCK_BYTES

LAYOUT = 1  # lanes.repack's layout; a change makes every copy stale
_PRODUCT = re.compile(r"(blk\.[0-9]+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)"
                      r"|output)\.weight")
_LAYER = re.compile(r"blk\.([0-9]+)\.")
_CHUNK = 16 << 20  # bytes copied a call: the copy's own memory stays small beside a rank's limit


def enabled() -> bool:
    return lanes.available() and os.environ.get("PRIMA_REF_REPACK", "1") != "0"


def packable(info: TensorInfo) -> bool:
    return (int(info.qtype) in BLOCK_BYTES and len(info.shape) == 2
            and info.n_rows % lanes.ROWS == 0 and _PRODUCT.fullmatch(info.name) is not None)


def cache_dir() -> Path:
    root = os.environ.get("PRIMA_REF_CACHE") or Path.home() / ".cache" / "prima-ref"
    return Path(root) / "packed"


def copy_path(source) -> Path:
    """Where the copy of the model file at `source` lives (whether or not it exists)."""
    real = Path(source).resolve()
    key = hashlib.sha256(str(real).encode()).hexdigest()[:16]
    return cache_dir() / f"{real.stem}.{key}.prima-packed"


def open_model(path, layers=None, head: bool = True) -> GGUFModel:
    """The file the engine maps for these layers (None: all) and, with head, the embedding and
    output: the repacked copy where enabled(), else the source."""
    source = GGUFModel.open(path)
    if not enabled():
        return source
    try:
        return open_copy(source, layers, head)
    finally:
        source.close()


def open_copy(source: GGUFModel, layers=None, head: bool = True) -> GGUFModel:
    """source's repacked copy, filled first with what these layers and the head need."""
    need = [t for t in source.tensors.values() if _wanted(t.name, layers, head)]
    path = copy_path(source.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the ranks of a local ring fill one copy in turn
        manifest = _current(source, path)
        missing = [t for t in need if t.name not in manifest["filled"]]
        if missing:
            mib = sum(t.n_bytes for t in missing) / 2**20
            print(f"[load] repacked copy: writing {len(missing)} tensors ({mib:.0f} MiB) to "
                  f"{path}", file=sys.stderr)
            _fill(source, path, missing)
            manifest["filled"] = sorted(set(manifest["filled"]) | {t.name for t in missing})
            _write_json(_manifest_path(path), manifest)
    copy = GGUFModel.open(path)
    filled = set(manifest["filled"])
    copy.absent = frozenset(n for n in copy.tensors if n not in filled)
    copy.packed = frozenset(n for n in filled if packable(copy.tensors[n]))
    return copy


def needs(names) -> tuple[set[int], bool]:
    """(layers, head) to open a copy with for these tensors: their layer ids, and whether any
    is outside the layers (the embedding, the output)."""
    matches = [_LAYER.match(n) for n in names]
    return {int(m.group(1)) for m in matches if m}, not all(matches)


def _wanted(name: str, layers, head: bool) -> bool:
    m = _LAYER.match(name)
    if m is None:
        return head
    return layers is None or int(m.group(1)) in layers


def _manifest_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _identity(source: GGUFModel) -> dict:
    st = os.stat(source.path)
    header = np.frombuffer(source._mm, np.uint8, count=source.data_offset) if source._mm else b""
    return {"layout": LAYOUT, "source": str(Path(source.path).resolve()), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "header_sha256": hashlib.sha256(header).hexdigest()}


def _current(source: GGUFModel, path: Path) -> dict:
    """The copy's manifest, after making a new, empty copy (header only) if it is missing or
    was made from another version of the source."""
    ident = _identity(source)
    try:
        manifest = json.loads(_manifest_path(path).read_text())
        if {k: manifest.get(k) for k in ident} == ident and path.stat().st_size == ident["size"]:
            return manifest
    except (OSError, ValueError):
        pass
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.truncate(ident["size"])  # sparse: the tensors are written as openers need them
        f.write(source._mm[: source.data_offset])
    os.replace(tmp, path)
    manifest = {**ident, "filled": []}
    _write_json(_manifest_path(path), manifest)
    _forget_orphans(path.parent)
    return manifest


def _forget_orphans(folder: Path) -> None:
    """Delete the copies whose source file is gone (models built in temporary folders)."""
    for manifest in folder.glob("*.json"):
        try:
            if not Path(json.loads(manifest.read_text())["source"]).exists():
                manifest.with_suffix(".prima-packed").unlink(missing_ok=True)
                manifest.unlink(missing_ok=True)
        except (OSError, ValueError, KeyError, TypeError):
            continue


def _fill(source: GGUFModel, path: Path, tensors: list[TensorInfo]) -> None:
    """Write each tensor's bytes into the copy, repacked where packable; the source's pages are
    read with pread and dropped after, so the page cache keeps the copy, not both."""
    src_fd = os.open(source.path, os.O_RDONLY)
    dst_fd = os.open(path, os.O_WRONLY)
    try:
        for t in sorted(tensors, key=lambda t: t.offset):
            pack, row_bytes = packable(t), t.n_bytes // t.n_rows
            group = lanes.ROWS * row_bytes  # a chunk of whole 16-row groups where repacked
            step = max(1, _CHUNK // group) * group if pack else _CHUNK
            for at in range(t.offset, t.end, step):
                part = _pread(src_fd, at, min(step, t.end - at))
                if pack:
                    part = lanes.repack(part.reshape(-1, row_bytes), BLOCK_BYTES[int(t.qtype)])
                _pwrite(dst_fd, part, at)
            os.posix_fadvise(src_fd, t.offset, t.n_bytes, os.POSIX_FADV_DONTNEED)
        os.fsync(dst_fd)  # the manifest, written next, must not name bytes still in flight
    finally:
        os.close(src_fd)
        os.close(dst_fd)


def _pread(fd: int, offset: int, n: int) -> np.ndarray:
    out = np.empty(n, np.uint8)
    view, done = memoryview(out), 0
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"the model file ended at byte {offset + done} while copying it")
        done += got
    return out


def _pwrite(fd: int, data: np.ndarray, offset: int) -> None:
    view, done = memoryview(np.ascontiguousarray(data).reshape(-1)), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)
