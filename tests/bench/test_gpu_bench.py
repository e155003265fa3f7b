"""``kvpack bench --device cuda``'s harness (:mod:`kvpack.bench.gpu`) run on the CPU with tiny shapes: rows,
bytes, ratios and validation are checked, never timings. On a GPU the same functions time the Triton kernels
(scripts/gpu_check.sh)."""

from __future__ import annotations

import argparse
import importlib.util

import pytest
import torch

import kvpack
from kvpack.bench import gpu
from kvpack.cli import main


def _args(**overrides):
    args = dict(dtype="bfloat16", heads=4, kv_heads=2, head_dim=64, grid="quick", context=[300], batch=[1, 2],
                methods=["kvpack KIVI-2", "kvpack turbo", "kvpack QJL-256"], max_cache_gb=1.0, seed=0)  # fmt: skip
    return argparse.Namespace(**(args | overrides))


def test_attention_rows_measure_every_method_against_sdpa_and_count_the_bytes_read(tmp_path):
    rows = gpu.run_attention(_args(), "cpu", log=lambda *a: None)
    kvpack_rows = [r for r in rows if r["method"].startswith("kvpack")]
    assert {(r["method"], r["batch"]) for r in kvpack_rows} == {(m, b) for m in _args().methods for b in (1, 2)}
    for row in kvpack_rows:
        sdpa = next(r for r in rows if r["method"] == "bfloat16 SDPA" and r["batch"] == row["batch"])
        assert sdpa["bytes_read"] == 2 * row["batch"] * 2 * 300 * 64 * 2  # K and V in bf16
        assert row["bytes_read"] < sdpa["bytes_read"]
        assert row["vs_sdpa"] == pytest.approx(sdpa["ms"] / row["ms"])
        assert row["check"] is not None and row["check"] < 2e-2  # validated against the reference first
    table = gpu.markdown(rows, {"gpu": "cpu", "torch": torch.__version__, "triton": "-"})
    assert table.count("\n| ") == len(rows) + 1  # a header and one line per row
    assert gpu.plot(rows, tmp_path / "bench.png") is None and (tmp_path / "bench.png").stat().st_size > 0


def test_a_step_that_computes_something_else_fails_validation(monkeypatch):
    kernel = kvpack.kernels.registered()["turbo_decode"]
    monkeypatch.setattr(kernel, "cpu", lambda *args: kernel.reference(*args) * 1.05)
    with pytest.raises(RuntimeError, match="'kvpack turbo' fails validation"):
        gpu.run_attention(_args(methods=["kvpack turbo"], batch=[1]), "cpu", log=lambda *a: None)


def test_cuda_is_refused_clearly_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit, match="no CUDA GPU is visible"):
        main(["bench", "--device", "cuda", "--out", str(tmp_path)])


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_random_model_is_built_in_its_dtype_and_generates_through_the_bench():
    shape = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=100)  # fmt: skip
    from kvpack.bench import run_generate
    from kvpack.hf import loading

    model = loading.random_llama(shape, torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    args = argparse.Namespace(gen_context=[40], repeat=1, gen_methods=["bf16 DynamicCache", "kvpack KIVI-2"],
                              gen_batch=[2], gen_tokens=2, memory_budget_gb=1e-3, seed=0)  # fmt: skip
    with torch.no_grad():
        rows = run_generate(args, model, log=lambda *a: None)
    batch_rows = {r["method"]: r for r in rows if r["part"] == "generate"}
    assert set(batch_rows) == {"bf16 DynamicCache", "kvpack KIVI-2"}
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_the_gpu_check_script_runs_commands_that_parse(tmp_path):
    """scripts/gpu_check.sh --dry-run prints its steps: the tests it names exist and its kvpack commands
    parse (the script cannot be run here; a typo must not wait for a GPU to show)."""
    import shlex
    import subprocess
    from pathlib import Path

    from kvpack.cli import build_parser

    root = Path(__file__).resolve().parents[2]
    printed = subprocess.run(["bash", str(root / "scripts/gpu_check.sh"), "--dry-run", str(tmp_path)],
                             capture_output=True, text=True, check=True).stdout.splitlines()  # fmt: skip
    tests, *commands = (shlex.split(line) for line in printed)
    assert tests[1:3] == ["-m", "pytest"] and all((root / t).exists() for t in tests if t.startswith("tests/"))
    assert len(commands) == 2
    for command in commands:
        assert command[1:3] == ["-m", "kvpack.cli"]
        args = build_parser().parse_args(command[3:])
        assert args.device == "cuda" and args.out.startswith(str(tmp_path))
    unknown = set(build_parser().parse_args(commands[1][3:]).gen_methods) - {"bf16 DynamicCache"}
    assert unknown <= set(kvpack.bench.generate_methods())
