"""A whole layer on the GPU (prima_ref.gpu.layer.GpuLayer) against the CPU layer, and the
-ngl layer choice. Runs on a CUDA device when there is one, else under numba's CUDA simulator
on a tiny synthetic qwen2 model (biases, GQA, NEOX rope); bench/gpu.py runs the real models."""

import os

import gpu_env  # noqa: F401  (picks the simulator or the device before numba.cuda loads)
import numpy as np
import pytest
from numba import cuda  # noqa: E402

from prima_ref.gpu import choose_layers, windows_of  # noqa: E402

SIM = "simulator" in getattr(cuda.to_device, "__module__", "")  # numba.cuda was loaded as it


def test_windows_and_layer_choice():
    assert windows_of([0, 1, 2, 10, 11, 12]) == [[0, 1, 2], [10, 11, 12]]
    on, left = choose_layers([0, 1, 2, 10, 11, 12], 2, lambda il: 10, None)
    assert on == [1, 2, 11, 12] and left == []
    on, left = choose_layers([0, 1, 2, 10, 11, 12], 2, lambda il: 10, 25)  # room for 2
    assert on == [2, 12] and left == [1, 11]
    assert choose_layers(range(4), 0, lambda il: 1, None) == ([], [])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from prima_ref.derived import SyntheticSpec, make_synthetic
    from prima_ref.gguf_file import GGUFModel

    spec = SyntheticSpec(name="synth-gpu-tiny", arch="qwen2", seed=5,
                         layer_types=("Q4_1", "Q8_0", "Q5_0", "Q4_0", "F32", "Q5_1", "F16"),
                         embd_type="Q8_0", output_type="Q8_0", n_layer=2, n_embd=64, n_ff=128,
                         n_head=2, n_head_kv=1)
    src = os.path.join(os.path.dirname(__file__), "data", "models", "synth-qwen2-kquants.gguf")
    path = make_synthetic(tmp_path_factory.mktemp("m") / "tiny.gguf", spec, src)
    with GGUFModel.open(path) as g:
        yield g


@pytest.mark.skipif(SIM and not os.environ.get("PRIMA_GPU_SIM_SLOW"),
                    reason="minutes under the CUDA simulator (PRIMA_GPU_SIM_SLOW=1 runs it); "
                    "it runs on any machine with a CUDA device")
def test_gpu_layer_matches_cpu_layer(tiny_model):
    from prima_ref.model.transformer import Transformer

    if not SIM and not cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = Transformer(tiny_model, 16)
    gpu = Transformer(tiny_model, 16, gpu_layers=1)  # the last layer
    assert sorted(gpu.gpu) == [1]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    pos = np.arange(3)
    ref = cpu.forward_layers(x, pos, 0, 2)
    out = gpu.forward_layers(x, pos, 0, 2)
    # decode step reads the GPU KV cache written by the prefill
    x1 = rng.standard_normal((1, 64)).astype(np.float32)
    ref1 = cpu.forward_layers(x1, np.array([3]), 0, 2)
    out1 = gpu.forward_layers(x1, np.array([3]), 0, 2)
    for a, b in ((out, ref), (out1, ref1)):
        err = np.sum((a.astype(np.float64) - b) ** 2) / np.sum(b.astype(np.float64) ** 2)
        assert err < 1e-6, err  # int8 rounding flips give ~1e-7 at most
    gpu.kv_remove(0)
    k = gpu.gpu[1].k_cache.copy_to_host()
    assert not k.any()


def test_plan_gpu_layers_per_rank():
    from prima_ref.ring.topology import plan_gpu_layers

    raw = {"ranks": [{"rank": 0, "gpu_layers_per_window": 3},
                     {"rank": 1, "gpu_layers": [[4, 5], [9, 10]], "gpu_layers_per_window": 0},
                     {"rank": 2}]}
    assert [plan_gpu_layers(raw, r) for r in range(4)] == [3, 2, 0, 0]


def test_without_cuda_ngl_keeps_every_layer_on_the_cpu(tmp_path):
    """A real run in a fresh process where numba.cuda finds no device: no error, one [gpu] line."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    probe = subprocess.run([sys.executable, "-c",
                            "from numba import cuda; print(cuda.is_available())"],
                           capture_output=True, text=True, env=env, timeout=120)
    if probe.stdout.strip() != "False":
        pytest.skip("this machine has a CUDA device")
    model = os.path.join(os.path.dirname(__file__), "data", "models", "synth-qwen2-kquants.gguf")
    code = ("import numpy as np\n"
            "from prima_ref.gguf_file import GGUFModel\n"
            "from prima_ref.model.transformer import Transformer\n"
            f"t = Transformer(GGUFModel.open({model!r}), 16, gpu_layers=2, gpu_mem_gib=1.0)\n"
            "print(len(t.gpu), t.forward([1, 2, 3], 0).shape)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "0"
    gpu_lines = [ln for ln in out.stderr.splitlines() if ln.startswith("[gpu]")]
    assert len(gpu_lines) == 1 and "stays on the CPU" in gpu_lines[0]


def tiny_gemma3(path):
    """A 2-layer gemma3 file with random weights: q/k norms, post norms, GELU, a sliding
    window of 2 (layer 1 is local), tied head; only types gguf can quantize."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import quants as gq

    n_embd, n_ff, n_head, n_kv, hd, n_vocab = 64, 128, 2, 1, 32, 64
    rng = np.random.default_rng(9)
    w = gguf.GGUFWriter(path, arch="gemma3")
    w.add_context_length(64)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_block_count(2)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1000000.0)
    w.add_uint32("gemma3.attention.sliding_window", 2)

    def mat(name, rows, cols, qtype):
        x = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        w.add_tensor(name, gq.quantize(x, qtype), raw_dtype=qtype)

    def vec(name, n):
        w.add_tensor(name, (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32))

    mat("token_embd.weight", n_vocab, n_embd, Q.Q8_0)
    vec("output_norm.weight", n_embd)
    types = (Q.Q8_0, Q.Q5_0, Q.Q4_1, Q.Q5_1, Q.Q4_0, Q.Q8_0, Q.Q5_0)
    for il in range(2):
        p = f"blk.{il}."
        for n in ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm"):
            vec(p + n + ".weight", n_embd)
        vec(p + "attn_q_norm.weight", hd)
        vec(p + "attn_k_norm.weight", hd)
        shapes = [("attn_q", n_head * hd, n_embd), ("attn_k", n_kv * hd, n_embd),
                  ("attn_v", n_kv * hd, n_embd), ("attn_output", n_embd, n_head * hd),
                  ("ffn_gate", n_ff, n_embd), ("ffn_up", n_ff, n_embd), ("ffn_down", n_embd, n_ff)]
        for (n, r, c), t in zip(shapes, types, strict=True):
            mat(p + n + ".weight", r, c, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.skipif(SIM and not os.environ.get("PRIMA_GPU_SIM_SLOW"),
                    reason="minutes under the CUDA simulator (PRIMA_GPU_SIM_SLOW=1 runs it); "
                    "it runs on any machine with a CUDA device")
def test_gemma3_gpu_layer_matches_cpu_layer(tmp_path):
    from prima_ref.gguf_file import GGUFModel
    from prima_ref.model.transformer import Transformer

    if not SIM and not cuda.is_available():
        pytest.skip("no CUDA device")
    with GGUFModel.open(tiny_gemma3(tmp_path / "g.gguf")) as g:
        cpu = Transformer(g, 16)
        gpu = Transformer(g, 16, gpu_layers=1)
        assert cpu.cfg.qk_norm and cpu.cfg.post_norms and cpu.cfg.is_swa(1)
        assert sorted(gpu.gpu) == [1]
        for start, n in ((0, 4), (4, 1)):  # a prefill past the window, then a decode step
            x = np.random.default_rng(start).standard_normal((n, 64)).astype(np.float32)
            pos = np.arange(start, start + n)
            ref = cpu.forward_layers(x, pos, 0, 2)
            out = gpu.forward_layers(x, pos, 0, 2)
            err = np.sum((out.astype(np.float64) - ref) ** 2) / np.sum(ref.astype(np.float64) ** 2)
            assert err < 1e-6, err  # int8 rounding flips give ~1e-7 at most
