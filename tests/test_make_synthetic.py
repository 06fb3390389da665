"""prima_ref/derived.py: the Q8_0 SmolLM2 it writes is a faithful requantisation."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from prima_ref.gguf_file import GGUFModel

from prima_ref.derived import make_smollm2_q8_0


@pytest.mark.slow
def test_smollm2_q8_0_keeps_metadata_and_requantizes_every_q4_1_tensor(smollm2_path, tmp_path):
    dst = make_smollm2_q8_0(tmp_path / "q8.gguf", smollm2_path)
    src, out = GGUFModel.open(smollm2_path), GGUFModel.open(dst)
    keys = [k for k in src.metadata if k != "general.file_type"]
    for key in keys:
        a, b = src.get(key), out.get(key)
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, key
    assert out.get("general.file_type") == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert list(out.tensors) == list(src.tensors)
    for name in src.tensors:
        before, after = src.tensor_info(name), out.tensor_info(name)
        assert after.shape == before.shape
        if before.qtype != Q.Q4_1:
            assert after.qtype == before.qtype
            assert np.array_equal(out.tensor_bytes(name), src.tensor_bytes(name))
            continue
        assert after.qtype == Q.Q8_0
        x = gguf.quants.dequantize(src.tensor_rows(name), Q.Q4_1)
        y = gguf.quants.dequantize(out.tensor_rows(name), Q.Q8_0)
        # Q8_0 rounds each 32-value block to a step of max|x|/127: half a step, plus up to
        # 127 times the fp16 rounding of the step (2^-11 relative) at the block's extremes
        step = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        bound = step * (0.5 + 127 * 2.0**-11) + 1e-12
        assert np.all(np.abs((y - x).reshape(-1, 32)) <= bound), name
