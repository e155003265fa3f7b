"""Every instruction-set build of the CPU kernels that this CPU can run, checked against the reference.

The library is built for this CPU (-march=native) by default; ``KVPACK_CPU_ISA`` forces one of the levels
of kvpack.kernels.native.ISA_LEVELS (avx512, avx2, scalar) that the CPU reports. Each level runs a subset of tests/kernels/
test_kernels.py in a child process (the level is chosen at load time, once per process): every kernel's
parallel and remainder paths against the reference (2x its error), the fused decode step (float32 stores),
quantize/pack bit for bit.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from kvpack.kernels import native
from kvpack.machine import cpu_flags

HERE = Path(__file__).resolve().parent
SUBSET = (
    "ops_pass or (quantize_pack_is_bit_exact and float16 and float32) or pack_signs_is_bit_exact or "
    "parallel_paths_match or (qjl_key_scores_matches and 64-default) or layer_attend_fast_matches or "
    "(decode_step and f32)"
)
pytestmark = [pytest.mark.build, pytest.mark.slow]


def runnable_levels() -> list[str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    return [name for name, _, needs in native.ISA_LEVELS if needs <= cpu_flags()]


@pytest.mark.parametrize("level", [name for name, _, _ in native.ISA_LEVELS])
def test_each_instruction_set_build_matches_the_reference(level):
    if level not in runnable_levels():
        pytest.skip(f"this CPU cannot run the {level} build (or is not x86-64)")
    env = {**os.environ, "KVPACK_CPU_ISA": level, "KVPACK_KERNELS": "fast"}
    env.pop("KVPACK_CXXFLAGS", None)
    check = f"from kvpack.kernels import native; native.load(); assert native.isa() == {level!r}, native.isa()"
    subprocess.run([sys.executable, "-c", check], env=env, check=True, timeout=300)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "test_kernels.py"), "-k", SUBSET],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, f"{level} build:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    assert " passed" in result.stdout.splitlines()[-1]


def test_levels_are_native_by_default_and_forced_only_where_the_cpu_has_them(monkeypatch):
    monkeypatch.delenv("KVPACK_CPU_ISA", raising=False)
    monkeypatch.delenv("KVPACK_CXXFLAGS", raising=False)
    assert native.isa() == "native"
    for level in runnable_levels():
        monkeypatch.setenv("KVPACK_CPU_ISA", level)
        assert native.isa() == level
    monkeypatch.setenv("KVPACK_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="KVPACK_CPU_ISA must be one of"):
        native.isa()
    missing = [name for name, _, needs in native.ISA_LEVELS if not needs <= cpu_flags()]
    if missing:
        monkeypatch.setenv("KVPACK_CPU_ISA", missing[0])
        with pytest.raises(RuntimeError, match="does not report"):
            native.isa()
    monkeypatch.setenv("KVPACK_CXXFLAGS", "-O2")
    assert native.isa() == "custom"
