"""prima-plan end to end: plan file, table, plots and LP dumps out; errors, not tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pulp
import pytest

from planner.cli import main
from planner.plan_file import check_plan

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "planner" / "examples"
HOME = str(EXAMPLES / "prima-home-cluster.toml")
M70 = str(EXAMPLES / "llama3-70b-q4k.model.json")


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def test_plan_70b_on_the_home_cluster_writes_plan_table_plots_and_lp(tmp_path, capsys):
    rc, out, err = run(capsys, "-d", HOME, "-m", M70, "-c", 4096, "-n", 64,
                       "-o", tmp_path / "plan.json", "--plot", tmp_path / "plots",
                       "--dump-lp", tmp_path / "lp")
    assert rc == 0, err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert check_plan(plan) == []
    assert [r["device"] for r in plan["ranks"]] == ["mac-m1", "laptop-3070", "desktop-2080ti",
                                                    "phone-kirin9000"]
    assert [(r["data_port"], r["signal_port"]) for r in plan["ranks"]] == [
        (9000, 10000), (9001, 10001), (9002, 10002), (9003, 10003)]
    assert plan["solver"]["status"] == "Optimal" and plan["ctx"] == 4096
    assert plan["latency_ms"]["per_token"] == pytest.approx(
        sum(plan["latency_ms"]["terms"].values()))
    for b in plan["baselines"].values():
        assert b["latency_ms"] > plan["latency_ms"]["per_token"]
    assert "predicted" in out and "desktop-2080ti" in out and "vs memory_proportional" in out
    stems = {"layers", "memory", "latency", "objective_vs_k"}
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {
        f"{s}.{e}" for s in stems for e in ("png", "svg")}
    lp_files = sorted((tmp_path / "lp").glob("*.lp"))
    assert len(lp_files) == len(plan["solver"]["objective_ms_by_k"]) == 10  # divisors of 80
    text = (tmp_path / "lp" / "halda_k1.lp").read_text()
    for row in ("windows_sum", "vram_cap_dev1", "disk_room_dev2", "reread_overflow_dev2"):
        assert row in text


def test_layer_lists_follow_the_ring_order_for_every_round(tmp_path, capsys):
    rc, _, err = run(capsys, "-d", HOME, "-m", M70, "-k", 2, "-o", tmp_path / "p.json")
    assert rc == 0, err
    plan = json.loads((tmp_path / "p.json").read_text())
    ranks = plan["ranks"]
    W = plan["layers_per_round"]
    assert W == 40
    for rnd in range(2):  # rank 1, 2, ..., R-1, then rank 0 in each round
        order = [x for r in ranks[1:] + ranks[:1] for x in r["layers"][rnd]]
        assert order == list(range(rnd * W, (rnd + 1) * W))
    for r in ranks:
        pairs = zip(r["gpu_layers"], r["layers"], strict=True)
        assert all(g == w[len(w) - len(g):] for g, w in pairs)
        assert r["n_gpu_layers"] == sum(len(g) for g in r["gpu_layers"])


def test_what_if_cluster_with_a_gguf_model_records_its_sha256(smollm2_path, tmp_path,
                                                              monkeypatch, capsys):
    monkeypatch.setenv("PRIMA_REF_CACHE", str(tmp_path / "cache"))
    cluster = tmp_path / "one.json"
    cluster.write_text(json.dumps({"schema": "prima-ref/cluster", "schema_version": 1,
                                   "devices": [{"name": "pi", "os": "linux", "cpu_cores": 4,
                                                "cpu_gbps": 3, "cpu_gflops": 20,
                                                "ram_read_gbps": 4, "ram_avail_gib": 2,
                                                "disk_seq_gbps": 0.1, "disk_rnd_gbps": 0.02,
                                                "link_latency_ms": 1, "link_gbps": 0.01}]}))
    rc, out, err = run(capsys, "-d", cluster, "-m", smollm2_path, "-o", tmp_path / "p.json")
    assert rc == 0, err
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["model"]["file"] == Path(smollm2_path).name
    assert plan["model"]["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea3737" \
                                      "28110db53"
    assert plan["ranks"][0]["layers"] == [list(range(30))] and plan["removed"] == []


def test_bad_profile_exits_2_naming_file_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(Path(HOME).read_text().replace("ram_avail_gib = 4.1", "ram_avail_gib = -4"))
    rc, _, err = run(capsys, "-d", bad, "-m", M70, "-o", tmp_path / "p.json")
    assert rc == 2
    assert f"{bad}: field 'devices[1].ram_avail_gib': expected a number >= 0.0" in err
    assert not (tmp_path / "p.json").exists()


def test_impossible_cluster_exits_1_with_the_memory_it_lacks(tmp_path, capsys):
    small = tmp_path / "small.toml"
    small.write_text(Path(HOME).read_text().replace("disk_free_gib = 200.0", "disk_free_gib = 0")
                     .replace("disk_free_gib = 100.0", "disk_free_gib = 0")
                     .replace("disk_free_gib = 50.0", "disk_free_gib = 0"))
    rc, _, err = run(capsys, "-d", small, "-m", M70, "-o", tmp_path / "p.json")
    assert rc == 1
    assert "model needs 37.9 GiB" in err and "the cluster offers 36.1 GiB of RAM, VRAM and " \
                                              "disk budget" in err and "add a device" in err


def test_keep_all_and_bad_arguments(tmp_path, capsys):
    m8 = EXAMPLES / "llama3-8b-q4k.model.json"
    rc, _, err = run(capsys, "-d", HOME, "-m", m8, "--keep-all", "-o", tmp_path / "p.json")
    assert rc == 0, err
    plan = json.loads((tmp_path / "p.json").read_text())
    assert len(plan["ranks"]) == 4 and all(r["n_layers"] >= 1 for r in plan["ranks"])
    rc, _, err = run(capsys, "-d", HOME, "-m", m8, "-k", 5, "-o", tmp_path / "q.json")
    assert rc == 1 and "-k 5 does not divide the model's 32 layers" in err
    rc, _, err = run(capsys, "-d", HOME, "-m", tmp_path / "nope.gguf")
    assert rc == 2 and "nope.gguf: cannot read model" in err


@pytest.mark.skipif(pulp.HiGHS().available(), reason="highspy is installed here")
def test_highs_without_highspy_says_how_to_get_it(tmp_path, capsys):
    rc, _, err = run(capsys, "-d", HOME, "-m", M70, "--solver", "highs",
                     "-o", tmp_path / "p.json")
    assert rc == 2 and "pip install highspy" in err


def test_python_dash_m_planner_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "planner", "-d", HOME, "-m", M70, "-o",
                          str(tmp_path / "p.json"), "--cases", "loop"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stderr.startswith("[plan] ") and "ms/token" in out.stdout
