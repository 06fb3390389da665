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
        assert err < 1e-9, err
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
