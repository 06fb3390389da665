import subprocess
import sys

import pytest

from prima_ref.quants.layouts import LAYOUTS


@pytest.mark.parametrize("module", ["prima_ref.cli", "prima_ref.server", "planner.cli", "profiler.cli"])
def test_console_entry_points_import_and_expose_main(module):
    mod = __import__(module, fromlist=["main"])
    assert callable(mod.main)


def test_numba_codegen_flags_set_before_numba_import():
    code = "import prima_ref, numba; print(numba.config.SLP_VECTORIZE, numba.config.LOOP_VECTORIZE)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "0"]


def test_every_layout_matches_gguf():
    from gguf.constants import GGML_QUANT_SIZES

    for qtype, layout in LAYOUTS.items():
        assert (layout.block_size, layout.type_size) == GGML_QUANT_SIZES[qtype]


def test_codegen_flags_hold_even_when_numba_is_imported_first():
    code = "import numba, prima_ref; print(numba.config.SLP_VECTORIZE, numba.config.LOOP_VECTORIZE)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "0"]
