"""The benchmark harness runs end to end (numbers are reported, never asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tlcore.testing import selected_backends

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_benchmark_writes_json_markdown_and_chart(tmp_path):
    backend = selected_backends()[0]
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--backends", backend, "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "quick.json").read_text())
    modes = {(r["mode"], r["impl"]) for r in report["rows"]}
    for mode in ("full", "frozen", "frozen_clip", "forward", "e2e_2_epochs", "stream", "stream_in_memory",
                 "stream_e2e_2_epochs"):
        assert {(mode, "tlcore"), (mode, "native")} <= modes
    assert all(r["median_ms"] > 0 for r in report["rows"])
    assert report["import_tlcore_ms"] > 0 and report["backends"][backend]["peak_rss_mb"] > 0
    assert all(r["fresh_process_ms"] > 0 for r in report["rows"] if r["mode"] == "e2e_2_epochs")
    table = (tmp_path / "quick.md").read_text()
    assert "tlcore/native" in table and "speed-up" in table and "DataLoader" in table
    assert (tmp_path / "quick.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.xdist_group("subprocess")
def test_memory_benchmark_writes_a_row_per_source_and_size(tmp_path):
    backend = selected_backends()[0]
    done = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--sizes", "250,500", "--backends", backend,
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert {(r["source"], r["images"]) for r in rows} == {(s, n) for s in ("generator", "memmap") for n in (250, 500)}
    assert all(r["peak_rss_mb"] > 0 and r["seconds"] > 0 for r in rows)
    table = (tmp_path / "memory.md").read_text()
    assert table.count(f"| {backend} |") == 2 and "feature cache" in table


@pytest.mark.slow
@pytest.mark.xdist_group("subprocess")
def test_lora_benchmark_writes_a_row_per_mode(tmp_path):
    pytest.importorskip("peft")
    if "torch" not in selected_backends():
        pytest.skip("the quick LoRA benchmark runs on torch")
    done = subprocess.run([sys.executable, "-m", "benchmarks.lora", "--quick", "--backends", "torch", "--out",
                           str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["mode"]: r for r in json.loads((tmp_path / "lora.json").read_text())["rows"]}
    assert set(rows) == {"lora", "full", "frozen_head"}
    for r in rows.values():
        assert r["backend"] == "torch" and "native_error" not in r and "tlcore_error" not in r
        assert r["tlcore_ms"] > 0 and r["native_ms"] > 0 and r["ratio"] > 0
        assert r["tlcore_trainable_params"] == r["native_trainable_params"] > 0
    for impl in ("tlcore", "native"):
        assert 0 < rows["lora"][f"{impl}_optimizer_state_bytes"] < rows["full"][f"{impl}_optimizer_state_bytes"]
    table = (tmp_path / "lora.md").read_text()
    assert table.count("| torch |") == 3 and "PEFT" in table


@pytest.mark.slow
@pytest.mark.xdist_group("subprocess")
def test_distributed_benchmark_writes_1_and_2_replica_rows(tmp_path):
    backends = selected_backends()[-1:]  # one backend keeps it short; each backend's engine is tested in its own tests
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--distributed", "--quick", "--backends",
                           ",".join(backends), "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "distributed_quick.json").read_text())["rows"]
    assert sorted((r["backend"], r["replicas"]) for r in rows) == sorted((b, n) for b in backends for n in (1, 2))
    for r in rows:
        assert not r.get("error") and r["tlcore_ms"] > 0 and r["native_ms"] > 0 and r["ratio"] > 0, r
    table = (tmp_path / "distributed_quick.md").read_text()
    assert all(f"| {r['backend']} | {r['replicas']} | {r['engine']} |" in table for r in rows)
