"""The fast CPU kernels' shared library: every method's ``cpu.cpp`` compiled on first use, loaded with ctypes.

The library is plain C++ (no torch headers), so building it takes seconds rather than the minutes a
``torch.utils.cpp_extension`` build of ``torch/extension.h`` takes. Its sources are
``kernels/csrc/abi.cpp`` plus ``methods/<name>/cpu.cpp`` of every method folder, sharing the headers of
``kernels/csrc`` (``kvpack.h``; ``decode.h``, the fused decode step; ``affine.h``, min-max codes). It is built once per source set, compiler, flags and target into ``kernels/``
of kvpack's cache folder (``$KVPACK_CACHE``, else ``~/.cache/kvpack``) and loaded from there afterwards.
It is compiled with ``-fopenmp``; loaded after torch, the dynamic loader resolves its ``libgomp.so.1`` to
the copy torch already loaded, so both share one OpenMP thread pool and ``torch.set_num_threads`` governs
both.

Each method's ``cpu.py`` declares its entry points with :func:`entry`: an ``extern "C" int`` function
taking a pointer to one argument struct, mirrored by a ``ctypes.Structure``.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

from kvpack.paths import cache_root

__all__ = [
    "ABI_VERSION",
    "ISA_LEVELS",
    "available",
    "cache_dir",
    "call",
    "call_flat",
    "double_bits",
    "entry",
    "isa",
    "load",
    "sources",
]

logger = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parent.parent
_HEADER = Path(__file__).with_name("csrc") / "kvpack.h"
#: The ABI version, written once: in kvpack.h, read from there.
ABI_VERSION = int(re.search(r"#define KVPACK_ABI_VERSION (\d+)", _HEADER.read_text()).group(1))
#: Instruction-set levels the library can be built for on x86-64, best first: (name, target flags, the
#: /proc/cpuinfo flags a CPU needs to run it). By default the library is built for the CPU it runs on
#: (``-march=native``: built at first use on this machine and cached under the compiler's own expansion of
#: the flag, so a cache folder shared with another CPU gets that CPU's own build); ``$KVPACK_CPU_ISA``
#: forces a level (the tests run the fallbacks that way). The SIMD paths are AVX2/FMA intrinsics; ``scalar``
#: runs the plain C++ fallbacks. Measured on a Rocket Lake Xeon (KIVI key scores, 8k tokens, batch 8, one
#: thread): native 1.61 ms, avx512 (x86-64-v4) 1.88 ms, avx2 2.03 ms; -march=native also enables the
#: CPU's newer extensions (VBMI, GFNI, ...) and its tuning.
ISA_LEVELS = (
    ("avx512", ("-march=x86-64-v4",), frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})),
    ("avx2", ("-march=x86-64-v3",), frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe"})),
    ("scalar", ("-march=x86-64",), frozenset()),
)
_OPTIMIZE = ("-O3",)
_REQUIRED_FLAGS = ("-std=c++17", "-fopenmp", "-fPIC")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_ENTRIES: dict[str, type[ctypes.Structure]] = {}
_FUNCTIONS: dict[str, ctypes._CFuncPtr] = {}  # declared entry points of the loaded library
_FLAT: dict[str, ctypes._CFuncPtr] = {}
_SIZES: dict[str, int] = {}
_DOUBLE, _DOUBLE_BYTES = struct.Struct("q"), struct.Struct("d")


def sources() -> list[Path]:
    """The library's C++ sources: the ABI file and every method folder's ``cpu.cpp``."""
    return [_HEADER.with_name("abi.cpp"), *sorted((_PACKAGE / "methods").glob("*/cpu.cpp"))]


def entry(name: str, args: type[ctypes.Structure]) -> None:
    """Declare entry point ``name``: ``int name(const args*)``. Called by the methods' ``cpu.py``."""
    _ENTRIES[name] = args
    if _lib is not None:
        _declare(_lib, name, args)


def _declare(lib: ctypes.CDLL, name: str, args: type[ctypes.Structure]) -> None:
    fn = getattr(lib, name)
    fn.argtypes = [ctypes.POINTER(args)]
    fn.restype = ctypes.c_int
    _FUNCTIONS[name] = fn
    flat = lib[name]  # a second function object: the same entry point, taking call_flat's array address
    flat.argtypes = [ctypes.c_void_p]
    flat.restype = ctypes.c_int
    _FLAT[name] = flat


def call(name: str, args: ctypes.Structure) -> int:
    """Run entry point ``name`` on ``args`` (a filled instance of its struct); returns its int result."""
    return _entry_point(_FUNCTIONS, name)(ctypes.byref(args))


def _entry_point(table: dict, name: str):
    """The declared function ``name`` of ``table`` (the hot path: no lock once the library is loaded)."""
    fn = table.get(name)
    if fn is None:
        load()
        fn = table[name]
    return fn


def call_flat(name: str, fields: list) -> int:
    """Run entry point ``name`` on its struct given as a flat list of 8-byte fields in declaration order
    (ints, pointers as ints, doubles as :func:`double_bits`): one C-level array build instead of a ctypes
    attribute set per field (the decode steps fill ~60 fields per call). The length is checked against the
    declared struct, so a list that does not match the layout is refused, never passed."""
    size = _SIZES.get(name)
    if size is None:
        size = _SIZES[name] = ctypes.sizeof(_ENTRIES[name])
    if len(fields) * 8 != size:
        raise RuntimeError(f"{name}: {len(fields)} fields given for a {size}-byte argument struct")
    fn = _entry_point(_FLAT, name)
    packed = array.array("q", fields)  # ~1 us; a ctypes array of 60 ints costs ~6 us to build
    return fn(packed.buffer_info()[0])  # `packed` lives until the call returns


def double_bits(x: float) -> int:
    """``x`` as a float64's bit pattern, for a ``double`` field of :func:`call_flat`."""
    return _DOUBLE.unpack(_DOUBLE_BYTES.pack(x))[0]


def cache_dir() -> Path:
    """Where built libraries are kept: ``$KVPACK_CACHE/kernels`` (default ``~/.cache/kvpack/kernels``)."""
    return cache_root() / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def isa() -> str:
    """The instruction-set level the library is built for here: ``"native"`` (this CPU, the default), a
    level of :data:`ISA_LEVELS` forced by ``$KVPACK_CPU_ISA`` (it must be one this CPU reports), or
    ``"custom"`` when ``$KVPACK_CXXFLAGS`` gives the flags.

    Raises:
        RuntimeError: ``$KVPACK_CPU_ISA`` names an unknown level or one this CPU cannot run.
    """
    from ..machine import cpu_flags

    if os.environ.get("KVPACK_CXXFLAGS"):
        return "custom"
    forced = os.environ.get("KVPACK_CPU_ISA") or "native"
    if forced == "native":
        return forced
    levels = {name: needs for name, _, needs in ISA_LEVELS}
    if forced not in levels:
        raise RuntimeError(f"KVPACK_CPU_ISA must be one of {(*levels, 'native')}, got {forced!r}")
    missing = levels[forced] - cpu_flags()
    if platform.machine().lower() not in ("x86_64", "amd64") or missing:
        raise RuntimeError(f"KVPACK_CPU_ISA={forced}: this CPU does not report {sorted(missing) or 'x86-64'}")
    return forced


def _flags() -> list[str]:
    custom = os.environ.get("KVPACK_CXXFLAGS")
    if custom:
        return [*shlex.split(custom), *_REQUIRED_FLAGS]
    level = isa()
    target = ("-march=native",) if level == "native" else next(t for name, t, _ in ISA_LEVELS if name == level)
    return [*_OPTIMIZE, *target, *_REQUIRED_FLAGS]


def _target_id(compiler: str, flags: list[str]) -> str:
    """What the binary depends on besides the sources: the compiler's own expansion of the flags (the cc1
    command line lists every ``-march=native`` feature, on any architecture), else the CPU's description."""
    try:
        result = subprocess.run([compiler, *flags, "-E", "-v", "-x", "c++", os.devnull], capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        lines = [line for line in result.stderr.splitlines() if "cc1" in line or "-target-feature" in line]
        if lines:
            return "\n".join(line.replace(os.devnull, "") for line in lines)
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def _build(compiler: str) -> Path:
    files = sources()
    flags = _flags()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    headers = sorted(_HEADER.parent.glob("*.h"))
    parts = [*(f.read_bytes() for f in headers), *(f.read_bytes() for f in files), " ".join(flags).encode(),
             version.encode(), _target_id(compiler, flags).encode()]  # fmt: skip
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = cache_dir() / f"kvpack_cpu-{isa()}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building the kvpack CPU kernels with %s into %s (once)", compiler, target.parent)
    include = ["-I", str(_HEADER.parent)]
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = [Path(tmp) / f"{i}-{f.parent.name}.o" for i, f in enumerate(files)]
        jobs = [subprocess.Popen([compiler, *flags, *include, "-c", str(f), "-o", str(o)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for f, o in zip(files, objects)]  # fmt: skip
        for job, f in zip(jobs, files):
            _, err = job.communicate()
            if job.returncode:
                raise RuntimeError(f"compiling {f} failed:\n{err[-2000:]}")
        out = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, "-shared", *map(str, objects), "-o", str(out)], capture_output=True,
                                text=True)  # fmt: skip
        if result.returncode:
            raise RuntimeError(f"linking the kvpack CPU kernels failed:\n{result.stderr[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders never see a partial file
    return target


def load() -> ctypes.CDLL:
    """Build (first time only) and load the library. Raises ``RuntimeError`` saying why it cannot."""
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            try:
                if os.name != "posix":
                    raise RuntimeError(f"the CPU kernels are built for POSIX systems, not {os.name}")
                compiler = _compiler()
                if compiler is None:
                    raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
                lib = ctypes.CDLL(str(_build(compiler)))
                lib.kvpack_abi_version.restype = ctypes.c_int
                if lib.kvpack_abi_version() != ABI_VERSION:
                    raise RuntimeError("stale kernel library in the cache (ABI mismatch)")
                for name, args in _ENTRIES.items():
                    _declare(lib, name, args)
                _lib = lib
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                _error = str(err)
        if _lib is None:
            raise RuntimeError(_error)
        return _lib


def available() -> str | None:
    """``None`` when the library loads, else why not."""
    if _lib is not None:  # the decode path asks on every call: no lock once loaded
        return None
    try:
        load()
    except RuntimeError as err:
        return str(err)
    return None
