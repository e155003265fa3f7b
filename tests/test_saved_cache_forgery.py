"""Damaged and forged saved caches: every case is refused with CacheFileError, or is a no-op, or (a forged but
well-formed state) loads into a layer whose fused step matches the reference and repeats exactly.

The cases run in a child process per method (tests/forgery_cases.py), so a crash in a kernel fails the test
with the child's output instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("safetensors")
pytestmark = pytest.mark.slow  # ~2,300 files through load and a fused step, in child processes

CHILD = Path(__file__).with_name("forgery_cases.py")


def run_cases(target: str, tmp_path: Path) -> list[dict]:
    env = {**os.environ, "KVPACK_KERNELS": "auto"}
    result = subprocess.run([sys.executable, str(CHILD), target, str(tmp_path)], capture_output=True, text=True,
                            timeout=600, env=env)  # fmt: skip
    assert result.returncode == 0, (
        f"the forgery child for {target} died (return code {result.returncode}; negative = killed by a signal)\n"
        f"last case output:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}"
    )
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def check(rows: list[dict]) -> None:
    assert rows and rows[0]["case"] == "original" and rows[0]["outcome"] == "loaded" and rows[0]["same"]
    problems = []
    for row in rows[1:]:
        outcome, kind = row["outcome"], row["kind"]
        if outcome == "error":
            problems.append(f"{row['case']}: not a CacheFileError: {row['message']}")
        elif outcome == "loaded":
            if not (row["deterministic"] and row["fast_matches_reference"]):
                problems.append(f"{row['case']}: loaded, but the fused step is unsafe: {row}")
            elif kind in ("damage", "structure") and not row["same"]:
                problems.append(f"{row['case']}: a {kind} edit loaded and changed the next step")
    assert not problems, "\n".join(problems[:30])
    assert all(row["outcome"] == "refused" for row in rows if row["kind"] == "damage" and "flip" in row["case"]
               and "(data)" in row["case"])  # fmt: skip


def test_the_matrix_covers_every_registered_method():
    sys.path.insert(0, str(CHILD.parent))
    import kvpack

    from forgery_cases import LAYER_CONFIGS

    assert {config.method for config in LAYER_CONFIGS.values()} == set(kvpack.method_names())


@pytest.mark.parametrize(
    "method", ["kivi", "kivi4", "qjl", "qjl_plain", "turbo", "turbo_sinks", "kivi_sliding", "kivi_centered_rotated"]
)
def test_layer_file_forgeries(tmp_path, method):
    rows = run_cases(method, tmp_path)
    assert len(rows) > 300 and {"damage", "structure", "content"} <= {row["kind"] for row in rows}  # the matrix ran
    check(rows)
    by_case = {row["case"]: row for row in rows}
    # Messages name the file, the layer and the tensor, or say what was expected.
    flip = next(row for row in rows if "(data)" in row["case"])
    assert "checksum" in flip["message"] and "forged.kvpack" in flip["message"]
    removed = by_case["remove 1.keys.residual"]
    assert removed["outcome"] == "refused" and "layer 1" in removed["message"]
    assert by_case["head_dim 4096 in the header"]["outcome"] == "refused"
    assert "larger than" in by_case["head_dim 4096 in the header"]["message"]
    assert by_case["a pickle"]["outcome"] == "refused" and by_case["random bytes"]["outcome"] == "refused"
    assert by_case["format 'kvpack-layers-v1'"]["outcome"] == "loaded"  # the old format still loads, validated
    if method.startswith("qjl") and method != "qjl_plain":
        assert by_case["fill 1.keys.groups.outlier_idx with 255"]["outcome"] == "refused"


def test_saved_cache_forgeries(tmp_path):
    pytest.importorskip("transformers")
    rows = run_cases("cache", tmp_path)
    check(rows)
    by_case = {row["case"]: row for row in rows}
    for case in ("a bfloat16 model", "a model with 3 layers", "a model with 1 kv head", "a model with head_dim 32",
                 "layer entries swapped", "layer 1 config key_bits=4"):  # fmt: skip
        assert by_case[case]["outcome"] == "refused", by_case[case]
    assert "bfloat16" in by_case["a bfloat16 model"]["message"]
