"""Derived GGUF models, written with the `gguf` package alone (no llama.cpp needed).

make_smollm2_q8_0: SmolLM2-135M with every Q4_1 tensor requantised to Q8_0
(quantize(dequantize(t, Q4_1), Q8_0), byte-identical to llama.cpp's own requantisation); all
other tensors and all metadata are copied, general.file_type says MOSTLY_Q8_0.

    python -m prima_ref.derived [--dst PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from prima_ref import fetch

SMOLLM2_Q8_0_NAME = "SmolLM2-135M-Instruct.Q8_0.gguf"
LLAMA_FTYPE_MOSTLY_Q8_0 = 7  # llama.h llama_ftype


def _log(msg: str) -> None:
    print(f"[synthetic] {msg}", file=sys.stderr, flush=True)


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter,
                  overrides: dict[str, object]) -> None:
    """Every key with its own GGUF type (as gguf's gguf_new_metadata does), values overridden
    where `overrides` says; GGUF.* are the reader's virtual fields, the writer adds the arch."""
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = overrides.get(field.name, field.contents())
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)


def requantize(tensor, src_type: GGMLQuantizationType, dst_type: GGMLQuantizationType):
    if tensor.tensor_type != src_type:
        return np.asarray(tensor.data), tensor.tensor_type
    floats = gguf.quants.dequantize(tensor.data, src_type)  # (rows, n_per_row) float32
    return gguf.quants.quantize(floats, dst_type), dst_type


def make_smollm2_q8_0(dst: str | os.PathLike | None = None,
                      src: str | os.PathLike | None = None) -> Path:
    """Write SmolLM2-135M-Instruct Q8_0 (by default into the model cache); returns its path."""
    src = Path(src) if src else fetch.fetch(fetch.SMOLLM2_Q4_1)
    dst = Path(dst) if dst else fetch.cache_dir() / SMOLLM2_Q8_0_NAME
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = dst.with_suffix(".tmp")
    writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
    copy_metadata(reader, writer, {gguf.Keys.General.FILE_TYPE: LLAMA_FTYPE_MOSTLY_Q8_0})
    n_requantized = 0
    for tensor in reader.tensors:
        data, qtype = requantize(tensor, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)
        n_requantized += qtype != tensor.tensor_type
        writer.add_tensor(tensor.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)  # never leave a half-written file under the final name
    _log(f"wrote {dst} ({dst.stat().st_size / 2**20:.1f} MiB, {n_requantized} tensors Q4_1->Q8_0)")
    return dst


def smollm2_q8_0() -> Path:
    """The cached SmolLM2 Q8_0 file, made on first use."""
    path = fetch.cache_dir() / SMOLLM2_Q8_0_NAME
    return path if path.exists() else make_smollm2_q8_0(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dst", help="output path (default: the prima-ref model cache)")
    parser.add_argument("--src", help="SmolLM2 Q4_1 GGUF (default: fetched into the cache)")
    args = parser.parse_args(argv)
    make_smollm2_q8_0(args.dst, args.src)
    return 0


if __name__ == "__main__":
    sys.exit(main())
