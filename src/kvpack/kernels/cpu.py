"""The fast CPU backend: ``csrc/kvpack_cpu.cpp`` compiled on first use and called through ctypes.

The library is plain C++ (no torch headers), so building it takes seconds rather than the minutes a
``torch.utils.cpp_extension`` build of ``torch/extension.h`` takes. It is built once per source, compiler
and CPU into ``kernels/`` of kvpack's cache folder (``$KVPACK_CACHE``, else ``~/.cache/kvpack``, as for the
converted model) and loaded from there afterwards. It is compiled with ``-fopenmp``; loaded after torch,
the dynamic loader resolves its ``libgomp.so.1`` to the copy torch already loaded, so both share one
OpenMP thread pool and ``torch.set_num_threads`` governs both.

Each wrapper takes the tensors the reference takes. :func:`unsupported` says why an input cannot run here
(the dispatcher in :mod:`kvpack.kernels` then falls back to the reference, or raises when the fast backend
was requested explicitly).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from kvpack.paths import cache_root

logger = logging.getLogger(__name__)

__all__ = [
    "available",
    "load",
    "kivi_key_scores",
    "value_weighted_sum",
    "qjl_key_scores",
    "turbo_key_scores",
    "turbo_weighted_sum",
    "quantize_pack_tokens",
    "quantize_pack_key_groups",
    "pack_signs",
    "unsupported",
    "cache_dir",
]

_SOURCE = Path(__file__).with_name("csrc") / "kvpack_cpu.cpp"
_ABI_VERSION = 7
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-fopenmp", "-shared", "-fPIC"]
_BITS = (2, 4, 8)
_SCALE_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_QUANT_BITS = (1, 2, 4, 8)  # turbo and the quantize/pack kernels

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def cache_dir() -> Path:
    """Where built libraries are kept: ``$KVPACK_CACHE/kernels`` (default ``~/.cache/kvpack/kernels``)."""
    return cache_root() / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _build(compiler: str) -> Path:
    source = _SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), version.encode(), _cpu_id().encode()]))
    target = cache_dir() / f"kvpack_cpu-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building the kvpack CPU kernels with %s into %s (once)", compiler, target.parent)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        result = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(out)], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{result.stderr[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders never see a partial file
    return target


_ENTRY_POINTS = {  # name -> return type; each takes (const int64_t* meta, void* const* ptrs), see the .cpp
    "kvpack_kivi_key_scores": None,
    "kvpack_value_weighted_sum": None,
    "kvpack_qjl_key_scores": None,
    "kvpack_quantize_tokens": ctypes.c_int,
    "kvpack_quantize_key_groups": ctypes.c_int,
    "kvpack_pack_signs": None,
    "kvpack_turbo_key_scores": None,
    "kvpack_turbo_weighted_sum": None,
}


def _declare(lib: ctypes.CDLL) -> None:
    lib.kvpack_abi_version.restype = ctypes.c_int
    for name, restype in _ENTRY_POINTS.items():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = restype


def _call(name: str, meta: list[int], tensors: list[torch.Tensor | None]):
    """Run entry point ``name`` on an int64 array ``meta`` and the tensors' data pointers (None: null).

    Two arrays rather than ~20 arguments: ctypes' per-argument conversion is most of a call's overhead.
    """
    ptrs = [None if t is None else t.data_ptr() for t in tensors]
    fn = getattr(load(), name)
    return fn((ctypes.c_int64 * len(meta))(*meta), (ctypes.c_void_p * len(ptrs))(*ptrs))


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
                _declare(lib)
                if lib.kvpack_abi_version() != _ABI_VERSION:
                    raise RuntimeError("stale kernel library in the cache (ABI mismatch)")
                _lib = lib
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                _error = str(err)
        if _lib is None:
            raise RuntimeError(_error)
        return _lib


def available() -> str | None:
    """``None`` when the library loads, else why not."""
    try:
        load()
    except RuntimeError as err:
        return str(err)
    return None


def _inner_contiguous(t: torch.Tensor, dims: int) -> bool:
    """The last ``dims`` axes are laid out contiguously (C order)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[-dims:]), reversed(t.stride()[-dims:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _codes_unsupported(codes) -> str | None:
    if codes.device.type != "cpu":
        return f"device {codes.device.type} (fast kernels run on CPU)"
    if codes.dtype != torch.uint8:
        return f"codes dtype {codes.dtype}"
    return None


def _common_unsupported(codes, scale, zero, bits, group_size) -> str | None:
    if bits not in _BITS:
        return f"bits={bits} (fast kernels take {_BITS})"
    if reason := _codes_unsupported(codes):
        return reason
    if scale.dtype not in _SCALE_TYPES or zero.dtype != scale.dtype:
        return f"scale/zero dtypes {scale.dtype}/{zero.dtype} (fast kernels take float32, float16, bfloat16)"
    if group_size % 8:
        return f"group_size {group_size} (fast kernels need a multiple of 8)"
    return None


def _turbo_unsupported(kernel, rows, codes, scale, codebook, bits) -> str | None:
    if bits not in _QUANT_BITS:
        return f"bits={bits} (fast turbo kernels take {_QUANT_BITS})"
    if reason := _codes_unsupported(codes):
        return reason
    if scale.dtype not in _SCALE_TYPES:
        return f"scale dtype {scale.dtype} (fast kernels take float32, float16, bfloat16)"
    if rows.dtype != torch.float32 or codebook.dtype != torch.float32:
        return f"query/weights and codebook dtypes {rows.dtype}/{codebook.dtype} (expected float32)"
    if codebook.shape != (2**bits,):
        return f"codebook shape {tuple(codebook.shape)} (expected ({2**bits},))"
    if kernel == "turbo_key_scores" and rows.shape[-1] * bits != codes.shape[-1] * 8:
        return f"head_dim {rows.shape[-1]} at {bits} bits does not fill the {codes.shape[-1]} code bytes"
    return None


def unsupported(kernel: str, *args) -> str | None:
    """Why ``kernel`` cannot run on these arguments here, or ``None``."""
    if kernel == "kivi_key_scores":
        query, codes, scale, zero, bits = args
        group = codes.shape[-1] * 8 // bits if bits in _BITS else 0
        return _common_unsupported(codes, scale, zero, bits, group) or (
            None if query.dtype == torch.float32 else f"query dtype {query.dtype} (expected float32)"
        )
    if kernel == "value_weighted_sum":
        weights, codes, scale, zero, bits, group_size = args
        return _common_unsupported(codes, scale, zero, bits, group_size) or (
            None if weights.dtype == torch.float32 else f"weights dtype {weights.dtype} (expected float32)"
        )
    if kernel == "qjl_key_scores":
        query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms = args
        if signs.device.type != "cpu":
            return f"device {signs.device.type} (fast kernels run on CPU)"
        if query.dtype != torch.float32 or sketch.dtype != torch.float32:
            return f"query/sketch dtypes {query.dtype}/{sketch.dtype} (expected float32)"
        if outlier_idx.dtype != torch.uint8:
            return f"outlier_idx dtype {outlier_idx.dtype} (fast kernels take uint8, head_dim <= 256)"
        if signs.dtype != torch.uint8 or outlier_signs.dtype != torch.uint8:
            return f"sign dtypes {signs.dtype}/{outlier_signs.dtype} (expected uint8)"
        if norms.dtype not in _SCALE_TYPES or outlier_norms.dtype != norms.dtype:
            return f"norm dtypes {norms.dtype}/{outlier_norms.dtype} (fast kernels take float32, float16, bfloat16)"
        if sketch.shape[0] != signs.shape[-1] * 8 or sketch.shape[0] < outlier_signs.shape[-1] * 8:
            return f"sketch rows {sketch.shape[0]} do not match the {signs.shape[-1] * 8} sign bits"
        return None
    if kernel in ("turbo_key_scores", "turbo_weighted_sum"):
        rows, codes, scale, codebook, bits = args
        return _turbo_unsupported(kernel, rows, codes, scale, codebook, bits)
    if kernel in ("quantize_pack_tokens", "quantize_pack_key_groups"):
        x, bits, group_size, scale_dtype = args
        if x.device.type != "cpu":
            return f"device {x.device.type} (fast kernels run on CPU)"
        if x.dtype not in _SCALE_TYPES:
            return f"input dtype {x.dtype} (fast kernels take float32, float16, bfloat16)"
        if (scale_dtype or x.dtype) not in _SCALE_TYPES:
            return f"scale dtype {scale_dtype}"
        return None
    if kernel == "pack_signs":
        (x,) = args
        if x.device.type != "cpu":
            return f"device {x.device.type} (fast kernels run on CPU)"
        return None if x.dtype == torch.float32 else f"input dtype {x.dtype} (expected float32)"
    raise KeyError(kernel)


def kivi_key_scores(query, codes, scale, zero, bits):
    """Fused :func:`kvpack.kernels.reference.kivi_key_scores` (same arguments and result)."""
    batch, heads, rows, dim = query.shape
    n_groups = codes.shape[2]
    group = codes.shape[-1] * 8 // bits
    if query.stride(-1) != 1:
        query = query.contiguous()
    if not _inner_contiguous(codes, 3):
        codes = codes.contiguous()
    if not (_inner_contiguous(scale, 2) and scale.stride() == zero.stride()):
        scale, zero = scale.contiguous(), zero.contiguous()
    out = torch.empty(batch, heads, rows, n_groups * group, dtype=torch.float32)
    if out.numel() == 0:
        return out.zero_()
    meta = [*query.stride(), *codes.stride()[:2], *scale.stride()[:2], _SCALE_TYPES[scale.dtype],
            batch, heads, rows, n_groups, dim, group, bits, torch.get_num_threads()]  # fmt: skip
    _call("kvpack_kivi_key_scores", meta, [query, codes, scale, zero, out])
    return out


def value_weighted_sum(weights, codes, scale, zero, bits, group_size):
    """Fused :func:`kvpack.kernels.reference.value_weighted_sum` (same arguments and result)."""
    batch, heads, rows, tokens = weights.shape
    dim = scale.shape[-1] * group_size
    if weights.stride(-1) != 1:
        weights = weights.contiguous()
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    if not (scale.stride(-1) == 1 and scale.stride() == zero.stride()):
        scale, zero = scale.contiguous(), zero.contiguous()
    out = torch.empty(batch, heads, rows, dim, dtype=torch.float32)
    if tokens == 0 or out.numel() == 0:
        return out.zero_()
    meta = [*weights.stride(), *codes.stride()[:3], *scale.stride()[:3], _SCALE_TYPES[scale.dtype],
            batch, heads, rows, tokens, dim, group_size, bits, torch.get_num_threads()]  # fmt: skip
    _call("kvpack_value_weighted_sum", meta, [weights, codes, scale, zero, out])
    return out


def _inner(t: torch.Tensor, dims: int) -> torch.Tensor:
    return t if _inner_contiguous(t, dims) else t.contiguous()


def qjl_key_scores(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms):
    """Fused :func:`kvpack.kernels.reference.qjl_key_scores` (same arguments and result)."""
    batch, heads, rows, dim = query.shape
    n_groups, group = signs.shape[2], signs.shape[3]
    m, m_o, k = signs.shape[-1] * 8, outlier_signs.shape[-1] * 8, outlier_idx.shape[-1]
    if query.stride(-1) != 1:
        query = query.contiguous()
    sketched = (query @ sketch.T).contiguous()  # (B, H, M, m) = S q
    sketch_t = sketch.T.contiguous()  # (D, m): the columns of S, one per channel
    signs, norms = _inner(signs, 3), _inner(norms, 2)
    out = torch.empty(batch, heads, rows, n_groups * group, dtype=torch.float32)
    if out.numel() == 0:
        return out.zero_()
    m_o = m_o if k else 0  # without outlier channels there is no outlier part
    # Absent inputs (no outliers: k = 0; no outlier sketch: m_o = 0) travel as null pointers, strides 0.
    idx = _inner(outlier_idx, 2) if k else None
    if m_o:
        outlier_signs, outlier_norms = _inner(outlier_signs, 3), _inner(outlier_norms, 2)
    optional = [(idx, k), (outlier_signs, m_o), (outlier_norms, m_o)]
    strides2 = [t.stride()[:2] if used else (0, 0) for t, used in optional]
    meta = [*query.stride(), *strides2[0], *signs.stride()[:2], *norms.stride()[:2], *strides2[1], *strides2[2],
            _SCALE_TYPES[norms.dtype], batch, heads, rows, n_groups, dim, group, m, m_o, k,
            torch.get_num_threads()]  # fmt: skip
    tensors = [query, sketched, sketch_t, idx, signs, norms, outlier_signs if m_o else None,
               outlier_norms if m_o else None, out]  # fmt: skip
    _call("kvpack_qjl_key_scores", meta, tensors)
    return out


def _turbo_inputs(rows, codes, scale, codebook, tokens):
    """Checks the shapes the kernel trusts (it reads raw memory); returns the codes with a unit last stride
    (their batch/head/token strides, and all of scale's, travel in ``meta``) and a contiguous codebook.

    Raises:
        ValueError: ``rows`` (query or weights), codes and scale disagree on batch, heads or tokens.
    """
    batch, heads = rows.shape[:2]
    if codes.shape[:3] != (batch, heads, tokens) or scale.shape != (batch, heads, tokens):
        raise ValueError(
            f"codes {tuple(codes.shape)} and scale {tuple(scale.shape)} do not match {batch} batch, {heads} heads "
            f"and {tokens} tokens"
        )
    return codes if codes.stride(-1) == 1 else codes.contiguous(), codebook.contiguous()


def turbo_key_scores(query_rotated, codes, scale, codebook, bits):
    """Fused :func:`kvpack.kernels.reference.turbo_key_scores` (same arguments and result)."""
    batch, heads, rows, dim = query_rotated.shape
    tokens = codes.shape[2]
    if query_rotated.stride(-1) != 1:
        query_rotated = query_rotated.contiguous()
    codes, codebook = _turbo_inputs(query_rotated, codes, scale, codebook, tokens)
    out = torch.empty(batch, heads, rows, tokens, dtype=torch.float32)
    if out.numel() == 0:
        return out.zero_()
    meta = [*query_rotated.stride(), *codes.stride()[:3], *scale.stride(), _SCALE_TYPES[scale.dtype],
            batch, heads, rows, tokens, dim, bits, torch.get_num_threads()]  # fmt: skip
    _call("kvpack_turbo_key_scores", meta, [query_rotated, codes, scale, codebook, out])
    return out


def turbo_weighted_sum(weights, codes, scale, codebook, bits):
    """Fused :func:`kvpack.kernels.reference.turbo_weighted_sum` (same arguments and result)."""
    batch, heads, rows, tokens = weights.shape
    dim = codes.shape[-1] * 8 // bits
    if weights.stride(-1) != 1:
        weights = weights.contiguous()
    codes, codebook = _turbo_inputs(weights, codes, scale, codebook, tokens)
    out = torch.empty(batch, heads, rows, dim, dtype=torch.float32)
    if tokens == 0 or out.numel() == 0:
        return out.zero_()
    meta = [*weights.stride(), *codes.stride()[:3], *scale.stride(), _SCALE_TYPES[scale.dtype],
            batch, heads, rows, tokens, dim, bits, torch.get_num_threads()]  # fmt: skip
    _call("kvpack_turbo_weighted_sum", meta, [weights, codes, scale, codebook, out])
    return out


def quantize_pack_tokens(values, bits, group_size, scale_dtype=None):
    """Fused :func:`kvpack.kernels.reference.quantize_pack_tokens`: bit-identical outputs."""
    from . import reference

    batch, heads, tokens, dim = values.shape
    if bits not in _QUANT_BITS or group_size <= 0 or dim % group_size or values.numel() == 0:
        return reference.quantize_pack_tokens(values, bits, group_size, scale_dtype)  # raises, or trivial
    scale_dtype = scale_dtype or values.dtype
    if values.stride(-1) != 1:
        values = values.contiguous()
    codes = torch.empty(batch, heads, tokens, (dim * bits + 7) // 8, dtype=torch.uint8)
    scale = torch.empty(batch, heads, tokens, dim // group_size, dtype=scale_dtype)
    zero = torch.empty_like(scale)
    meta = [_SCALE_TYPES[values.dtype], *values.stride(), batch, heads, tokens, dim, group_size, bits,
            _SCALE_TYPES[scale_dtype], torch.get_num_threads()]  # fmt: skip
    bad = _call("kvpack_quantize_tokens", meta, [values, codes, scale, zero])
    if bad:  # NaN input or a scale overflowing scale_dtype: the reference raises its ValueError
        return reference.quantize_pack_tokens(values, bits, group_size, scale_dtype)
    return codes, scale, zero


def quantize_pack_key_groups(keys, bits, group_size, scale_dtype=None):
    """Fused :func:`kvpack.kernels.reference.quantize_pack_key_groups`: bit-identical outputs."""
    from . import reference

    batch, heads, tokens, dim = keys.shape
    if bits not in _QUANT_BITS or group_size <= 0 or tokens % group_size or keys.numel() == 0:
        return reference.quantize_pack_key_groups(keys, bits, group_size, scale_dtype)  # raises, or trivial
    scale_dtype = scale_dtype or keys.dtype
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    n_groups = tokens // group_size
    codes = torch.empty(batch, heads, n_groups, dim, (group_size * bits + 7) // 8, dtype=torch.uint8)
    scale = torch.empty(batch, heads, n_groups, dim, dtype=scale_dtype)
    zero = torch.empty_like(scale)
    meta = [_SCALE_TYPES[keys.dtype], *keys.stride(), batch, heads, n_groups, dim, group_size, bits,
            _SCALE_TYPES[scale_dtype], torch.get_num_threads()]  # fmt: skip
    bad = _call("kvpack_quantize_key_groups", meta, [keys, codes, scale, zero])
    if bad:
        return reference.quantize_pack_key_groups(keys, bits, group_size, scale_dtype)
    return codes, scale, zero


def pack_signs(x):
    """Fused :func:`kvpack.kernels.reference.pack_signs`: bit-identical outputs."""
    m = x.shape[-1]
    out = torch.empty(x.shape[:-1] + ((m + 7) // 8,), dtype=torch.uint8)
    if out.numel() == 0:
        return out
    rows = x.reshape(-1, m)  # a view when x's leading axes are mergeable, else one copy
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    _call("kvpack_pack_signs", [rows.stride(0), rows.shape[0], m, torch.get_num_threads()], [rows, out])
    return out
