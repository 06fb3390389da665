"""Profile schemas: loading, validation messages, and model profiles computed from real GGUFs."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import gguf
import pytest

from planner import latency
from planner.model_profile import LLAMA3_8B, LLAMA3_70B, llama_like, load_model, sha256_cached
from planner.profiles import (
    ProfileError,
    load_devices,
    load_model_profile,
    model_from_dict,
    model_to_dict,
)
from prima_ref import fetch

EXAMPLES = Path(__file__).resolve().parents[1] / "planner" / "examples"


def valid_device(name="box"):
    return {
        "schema": "prima-ref/device-profile", "schema_version": 1, "name": name,
        "host": "10.0.0.2", "os": "linux",
        "cpu": {"name": "x86", "cores": 8, "kv_copy_ms_per_layer": 0.01,
                "matvec": {"Q4_K": {"gbps": 20.0, "gflops": 80.0},
                           "default": {"gbps": 15.0, "gflops": 60.0}}},
        "memory": {"total_gib": 16, "available_gib": 9.5, "read_gbps": 30.0,
                   "swap_total_gib": 2, "page_cache_gib": 3.0, "cgroup_limit_gib": None},
        "disk": {"seq_read_gbps": 2.5, "rnd_read_gbps": 0.4, "free_gib": 120},
        "gpu": {"name": "RTX", "is_cuda": True, "has_metal": False, "vram_total_gib": 12,
                "vram_free_gib": 11, "bandwidth_gbps": 500,
                "matvec": {"default": {"gbps": 400, "gflops": 20000}}},
        "network": {"latency_ms": 2.0, "bandwidth_gbps": 0.1},
    }


def write(tmp_path, name, doc):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_a_valid_device_profile_loads_with_its_units(tmp_path):
    (device,) = load_devices([write(tmp_path, "box.json", valid_device())])
    assert device.memory.available_gib == 9.5 and device.gpu.is_cuda
    assert device.cpu_matvec["Q4_K"].gbps == 20.0 and device.network.bandwidth_gbps == 0.1


def _set(doc, dotted, value):
    *parents, last = dotted.split(".")
    for key in parents:
        doc = doc[key]
    if value is _DELETE:
        del doc[last]
    else:
        doc[last] = value


_DELETE = object()


@pytest.mark.parametrize("field, value, message", [
    ("memory.available_gib", _DELETE, "field 'memory.available_gib': missing"),
    ("memory.read_gbps", "fast", "field 'memory.read_gbps': expected a finite number"),
    ("disk.seq_read_gbps", 0, "field 'disk.seq_read_gbps': expected a number > 0"),
    ("os", "beos", "field 'os': expected one of linux, macos, android, windows"),
    ("schema_version", 4, "field 'schema_version': this prima-plan reads version 1 or 2 or 3"),
    ("memory.availabe_gib", 3, "unknown field 'memory.availabe_gib'"),
    ("gpu.has_metal", True, "field 'gpu.is_cuda': exactly one of is_cuda and has_metal"),
    ("memory.available_gib", 99, "field 'memory.available_gib': 99.0 GiB available exceeds"),
    ("cpu.cores", 2.5, "field 'cpu.cores': expected an integer >= 1"),
    ("cpu.matvec", {}, "field 'cpu.matvec': empty"),
])
def test_bad_device_profile_names_the_file_and_the_field(tmp_path, field, value, message):
    doc = valid_device()
    _set(doc, field, value)
    path = write(tmp_path, "bad.json", doc)
    with pytest.raises(ProfileError) as err:
        load_devices([path])
    assert str(path) in str(err.value) and message in str(err.value)


def test_metal_on_linux_is_rejected(tmp_path):
    doc = valid_device()
    doc["gpu"].update(is_cuda=False, has_metal=True)
    with pytest.raises(ProfileError, match="Metal needs os 'macos'"):
        load_devices([write(tmp_path, "m.json", doc)])


def test_unreadable_inputs_fail_with_the_path(tmp_path):
    (tmp_path / "broken.json").write_text("{ not json")
    with pytest.raises(ProfileError, match=r"broken.json: not valid JSON: .* line 1"):
        load_devices([tmp_path / "broken.json"])
    with pytest.raises(ProfileError, match="no such file or folder"):
        load_devices([tmp_path / "missing.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProfileError, match="folder holds no"):
        load_devices([tmp_path / "empty"])


def test_a_folder_gives_devices_in_name_order_and_names_must_be_unique(tmp_path):
    write(tmp_path, "b.json", valid_device("second"))
    write(tmp_path, "a.json", valid_device("first"))
    assert [d.name for d in load_devices([tmp_path])] == ["first", "second"]
    write(tmp_path, "c.json", valid_device("first"))
    with pytest.raises(ProfileError, match="device 'first' already given"):
        load_devices([tmp_path])


def test_a_quant_type_without_throughput_is_named(tmp_path):
    doc = valid_device()
    del doc["cpu"]["matvec"]["default"]
    (device,) = load_devices([write(tmp_path, "box.json", doc)])
    model = llama_like("m", n_layers=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2,
                       n_vocab=512, qtype="Q8_0")
    with pytest.raises(ProfileError, match=r"field 'cpu.matvec': no entry for Q8_0"):
        latency.device_costs([device], model, 128)


def test_home_cluster_example_holds_the_published_figures():
    devices = load_devices([EXAMPLES / "prima-home-cluster.toml"])
    assert [d.os for d in devices] == ["macos", "linux", "linux", "android"]
    assert [d.memory.available_gib for d in devices] == [2.4, 4.1, 9.7, 1.9]
    assert [d.disk.seq_read_gbps for d in devices[1:]] == [2.98, 3.17, 1.37]
    assert devices[0].disk.rnd_read_gbps == 0.72
    assert [d.gpu_backend for d in devices] == ["metal", "cuda", "cuda", "none"]


def test_whatif_cluster_errors_name_the_device(tmp_path):
    doc = {"schema": "prima-ref/cluster", "schema_version": 1,
           "devices": [{"name": "a", "os": "linux", "cpu_cores": 4}]}
    with pytest.raises(ProfileError, match=r"field 'devices\[0\].ram_avail_gib': missing"):
        load_devices([write(tmp_path, "c.json", doc)])


@pytest.mark.parametrize("stem, shape", [("llama3-8b-q4k", LLAMA3_8B),
                                         ("llama3-70b-q4k", LLAMA3_70B)])
def test_example_model_profiles_match_their_shapes(stem, shape):
    stored = load_model_profile(EXAMPLES / f"{stem}.model.json")
    fresh = llama_like(stored.name, **shape)
    assert model_to_dict(stored) == model_to_dict(fresh)
    # llama3-70b: 7 matvecs of 2*(d*d*2 + d*kv*2 + 3*d*ff) FLOPs per layer
    d, ff = shape["n_embd"], shape["n_ff"]
    kv = shape["n_head_kv"] * d // shape["n_head"]
    assert stored.layer.flops_by_type["Q4_K"] == 2 * (2 * d * d + 2 * d * kv + 3 * d * ff)
    assert stored.attn_flops_per_token_per_ctx_per_layer == 4 * d  # 2*2*n_head*head_dim


def _reader_totals(path):
    """Per-layer bytes and FLOPs by type, counted independently with gguf-py's reader."""
    reader = gguf.GGUFReader(path)
    n_layers = 1 + max(int(t.name.split(".")[1]) for t in reader.tensors
                       if t.name.startswith("blk."))
    layer_bytes, layer_flops = {}, {}
    for t in reader.tensors:
        if t.name.startswith("blk."):
            q = t.tensor_type.name
            layer_bytes[q] = layer_bytes.get(q, 0) + int(t.n_bytes) / n_layers
            if len(t.shape) >= 2:
                n = int(t.shape[0]) * int(t.shape[1])
                layer_flops[q] = layer_flops.get(q, 0) + 2 * n / n_layers
    total = sum(int(t.n_bytes) for t in reader.tensors)
    return n_layers, layer_bytes, layer_flops, total


@pytest.mark.parametrize("which", ["smollm2", pytest.param("gemma3", marks=pytest.mark.slow)])
def test_model_profile_from_gguf_matches_gguf_reader(which, smollm2_path, gemma3_path,
                                                     tmp_path, monkeypatch):
    monkeypatch.setenv("PRIMA_REF_CACHE", str(tmp_path))
    path = {"smollm2": smollm2_path, "gemma3": gemma3_path}[which]
    model = load_model(path)
    n_layers, layer_bytes, layer_flops, total = _reader_totals(path)
    assert model.n_layers == n_layers
    assert model.layer.bytes_by_type == pytest.approx(layer_bytes)
    assert model.layer.flops_by_type == pytest.approx(layer_flops)
    assert model.total_bytes == pytest.approx(total)
    assert model.output.flops_by_type  # both tie the output to the embedding
    assert sum(model.output.flops_by_type.values()) == 2 * model.n_vocab * model.n_embd
    assert model.kv_bytes_per_token_per_layer == 2 * model.n_head_kv * model.head_dim * 2
    again = model_from_dict(json.loads(json.dumps(model_to_dict(model))), model.source)
    assert model_to_dict(again) == model_to_dict(model)


def test_gemma3_profile_counts_the_tied_output_once(gemma3_path, tmp_path, monkeypatch):
    monkeypatch.setenv("PRIMA_REF_CACHE", str(tmp_path))
    model = load_model(gemma3_path)
    assert (model.n_layers, model.n_embd, model.n_head, model.head_dim) == (18, 640, 4, 256)
    assert model.input.bytes_by_type == {}  # the embedding is the output matrix
    assert model.output.bytes_by_type["Q8_0"] == 262144 * 640 // 32 * 34
    assert model.output.flops_by_type == {"Q8_0": 2 * 262144 * 640}
    assert model.attn_flops_per_token_per_ctx_per_layer == 2 * 2 * 4 * 256  # not x n_head_kv
    assert model.sha256 == fetch.GEMMA3_270M.sha256 and model.file == gemma3_path.name


def test_sha256_is_cached_by_path_size_and_mtime(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("PRIMA_REF_CACHE", str(tmp_path))
    copy_path = tmp_path / "model.gguf"
    copy_path.write_bytes(Path(smollm2_path).read_bytes())
    assert sha256_cached(copy_path) == fetch.SMOLLM2_Q4_1.sha256
    cache_file = tmp_path / "sha256-cache.json"
    cache = json.loads(cache_file.read_text())
    (key,) = cache
    cache_file.write_text(json.dumps({key: "f" * 64}))  # a cached value is trusted ...
    assert sha256_cached(copy_path) == "f" * 64
    stat = copy_path.stat()
    os.utime(copy_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # ... until it changes
    assert sha256_cached(copy_path) == fetch.SMOLLM2_Q4_1.sha256


def test_a_truncated_gguf_is_a_profile_error(smollm2_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(Path(smollm2_path).read_bytes()[:4096])
    with pytest.raises(ProfileError, match=str(cut)):
        load_model(cut)


def test_model_profile_json_errors_name_the_field(tmp_path):
    doc = model_to_dict(llama_like("m", n_layers=2, n_embd=256, n_ff=512, n_head=4,
                                   n_head_kv=2, n_vocab=512))
    bad = copy.deepcopy(doc)
    del bad["layer"]["flops_by_type"]
    with pytest.raises(ProfileError, match=r"m.json: field 'layer.flops_by_type': missing"):
        load_model(write(tmp_path, "m.json", bad))


def test_the_device_profile_example_in_the_readme_loads(tmp_path):
    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme.split("### Device profile", 1)[1]
    example = section.split("```json", 1)[1].split("```", 1)[0]
    (device,) = load_devices([write(tmp_path, "readme.json", json.loads(example))])
    assert device.name == "desktop-2080ti" and device.gpu.is_cuda


# ---------------------------------------------------------------------------------------------
# Schema v2: measured whole decode steps (cpu.decode) price a_m and kappa for their model


def _decode_entry(model, **over):
    return {"model": model.name, "n_layers": model.n_layers, "layer_bytes": model.layer.n_bytes,
            "layer_ms": 0.5, "fixed_ms": 3.0, "n_ctx": 33, "n_threads": 1, **over}


def test_v1_profiles_still_load_and_price_from_matvec(tmp_path):
    model = llama_like("m", n_layers=8, n_embd=512, n_ff=1024, n_head=8, n_head_kv=8,
                       n_vocab=1000, qtype="Q4_K")
    (v1,) = load_devices([write(tmp_path, "v1.json", valid_device())])
    assert v1.decode == () and v1.decode_for(model) is None
    doc = valid_device()
    doc["schema_version"] = 2  # v2 without decode entries prices exactly as v1
    (v2,) = load_devices([write(tmp_path, "v2.json", doc)])
    assert latency.cpu_layer_ms(v1, model, 256) == latency.cpu_layer_ms(v2, model, 256)
    assert latency.fixed_ms(v1, model) == latency.fixed_ms(v2, model)


def test_decode_entry_sets_layer_cost_and_fixed_cost_for_its_model_only(tmp_path):
    model = llama_like("m", n_layers=8, n_embd=512, n_ff=1024, n_head=8, n_head_kv=8,
                       n_vocab=1000, qtype="Q4_K")
    other = llama_like("m", n_layers=8, n_embd=512, n_ff=1024, n_head=8, n_head_kv=8,
                       n_vocab=1000, qtype="Q8_0")  # same name, another quant mix
    doc = valid_device()
    doc["schema_version"] = 2
    doc["cpu"]["decode"] = [_decode_entry(model)]
    (d,) = load_devices([write(tmp_path, "v2.json", doc)])
    assert d.decode_for(model).layer_ms == 0.5 and d.decode_for(other) is None
    # at the timed position nothing is added; beyond it, attention over the extra context
    assert latency.cpu_layer_ms(d, model, 33) == 0.5
    attn_ms = latency._attn_s(d, model, 1000 - 33, d.cpu_matvec, d.memory.read_gbps, "x") * 1e3
    assert latency.cpu_layer_ms(d, model, 1000) == pytest.approx(0.5 + attn_ms)
    assert attn_ms > 0
    assert latency.fixed_ms(d, model) == 3.0
    doc["cpu"]["decode"] = []
    (v1_like,) = load_devices([write(tmp_path, "v2b.json", doc)])
    assert latency.cpu_layer_ms(d, other, 256) == latency.cpu_layer_ms(v1_like, other, 256)


@pytest.mark.parametrize("entry, message", [
    ({"layer_ms": 0}, "field 'cpu.decode[0].layer_ms': expected a number > 0"),
    ({"n_ctx": 0}, "field 'cpu.decode[0].n_ctx': expected an integer >= 1"),
    ({"layer_msec": 1}, "unknown field 'cpu.decode[0].layer_msec'"),
])
def test_bad_decode_entry_names_the_field(tmp_path, entry, message):
    model = llama_like("m", n_layers=8, n_embd=512, n_ff=1024, n_head=8, n_head_kv=8,
                       n_vocab=1000, qtype="Q4_K")
    doc = valid_device()
    doc["schema_version"] = 2
    doc["cpu"]["decode"] = [_decode_entry(model, **entry)]
    with pytest.raises(ProfileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_devices([write(tmp_path, "bad.json", doc)])


def test_decode_entries_in_a_v1_profile_are_an_unknown_field(tmp_path):
    doc = valid_device()
    doc["cpu"]["decode"] = []
    with pytest.raises(ProfileError, match="unknown field 'cpu.decode'"):
        load_devices([write(tmp_path, "v1.json", doc)])


# ---------------------------------------------------------------------------------------------
# Schema v3: the ring runtime's own CPU work per window (ring) joins the hop term


def _ring_doc(**over):
    doc = valid_device()
    doc["schema_version"] = 3
    doc["ring"] = {"window_ms": 0.4, "round_ms": 0.3, "n_embd": 512, "model": "m",
                   "n_threads": 1, **over}
    return doc


def test_ring_cost_adds_to_a_workers_hop_per_window_and_to_rank0s_per_round(tmp_path):
    model = llama_like("m", n_layers=8, n_embd=512, n_ff=1024, n_head=8, n_head_kv=8,
                       n_vocab=1000, qtype="Q4_K")
    (plain,) = load_devices([write(tmp_path, "v1.json", valid_device())])
    (ring,) = load_devices([write(tmp_path, "v3.json", _ring_doc())])
    assert plain.ring is None and ring.ring.window_ms == 0.4
    network = latency.hop_ms(plain, model)
    assert latency.hop_ms(ring, model) == pytest.approx(network + 0.4)
    assert latency.hop_ms(ring, model, is_rank0=True) == pytest.approx(network + 0.3)
    costs = latency.device_costs([ring, ring], model, 64)
    assert [c.hop_ms for c in costs] == pytest.approx([network + 0.3, network + 0.4])
    # k rounds of a 2-device ring: k windows on each, each with its hop
    split = latency.Split(k=2, w=(2, 2), n=(0, 0))
    pred = latency.predict(costs, split, 1.0)
    assert pred.terms_ms["hop"] == pytest.approx(2 * (2 * network + 0.7))


@pytest.mark.parametrize("over, message", [
    ({"window_ms": -1}, "field 'ring.window_ms': expected a number >= 0"),
    ({"n_embd": 0}, "field 'ring.n_embd': expected an integer >= 1"),
    ({"window_msec": 1}, "unknown field 'ring.window_msec'"),
])
def test_bad_ring_entry_names_the_field(tmp_path, over, message):
    with pytest.raises(ProfileError, match=message):
        load_devices([write(tmp_path, "bad.json", _ring_doc(**over))])


def test_ring_in_a_v2_profile_is_an_unknown_field(tmp_path):
    doc = _ring_doc()
    doc["schema_version"] = 2
    with pytest.raises(ProfileError, match="unknown field 'ring'"):
        load_devices([write(tmp_path, "v2.json", doc)])
