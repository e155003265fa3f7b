"""The fast CPU backend: ``csrc/kvpack_cpu.cpp`` compiled on first use and called through ctypes.

The library is plain C++ (no torch headers), so building it takes seconds rather than the minutes a
``torch.utils.cpp_extension`` build of ``torch/extension.h`` takes. It is built once per source, compiler
and CPU into ``kernels/`` of kvpack's cache folder (``$KVPACK_CACHE``, else ``~/.cache/kvpack``, as for the
converted model) and loaded from there afterwards. It is compiled with ``-fopenmp``; loaded after torch,
the dynamic loader resolves its ``libgomp.so.1`` to the copy torch already loaded, so both share one
OpenMP thread pool and ``torch.set_num_threads`` governs both.

Each wrapper takes the tensors the reference takes and checks everything the C++ trusts before it passes
a pointer (one check function per kernel, below). :func:`unsupported` runs the same check for the
dispatcher in :mod:`kvpack.kernels`: it raises for malformed input and says why well-formed input cannot
run here (the dispatcher then falls back to the reference, or raises when the fast backend was requested
explicitly), after which the dispatcher calls the unchecked implementation in :data:`IMPLEMENTATIONS`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
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
_ABI_VERSION = 8
#: Optimization and target flags; ``$KVPACK_CXXFLAGS`` replaces them (e.g. ``-O3 -march=x86-64`` for a
#: portable build whose scalar paths are what the SIMD code falls back to). The rest are always added.
_DEFAULT_CXXFLAGS = ("-O3", "-march=native")
_REQUIRED_FLAGS = ("-std=c++17", "-fopenmp", "-shared", "-fPIC")
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


def _flags() -> list[str]:
    custom = os.environ.get("KVPACK_CXXFLAGS")
    return [*(shlex.split(custom) if custom else _DEFAULT_CXXFLAGS), *_REQUIRED_FLAGS]


def _target_id(compiler: str, flags: list[str]) -> str:
    """What the binary depends on besides the source: the compiler's own expansion of the flags (the cc1
    command line lists every ``-march=native`` feature, on any architecture), else the CPU's description."""
    probe = [f for f in flags if f not in ("-shared", "-fPIC")]
    try:
        result = subprocess.run([compiler, *probe, "-E", "-v", "-x", "c++", os.devnull], capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        lines = [line for line in result.stderr.splitlines() if "cc1" in line or "-target-feature" in line]
        if lines:
            return "\n".join(line.replace(os.devnull, "") for line in lines)
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def _build(compiler: str) -> Path:
    source = _SOURCE.read_bytes()
    flags = _flags()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    parts = [source, " ".join(flags).encode(), version.encode(), _target_id(compiler, flags).encode()]
    key = hashlib.sha256(b"\0".join(parts))
    target = cache_dir() / f"kvpack_cpu-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building the kvpack CPU kernels with %s into %s (once)", compiler, target.parent)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, str(_SOURCE), "-o", str(out)], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{result.stderr[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders never see a partial file
    return target


_ENTRY_POINTS = {  # name -> return type; each takes (const int64_t* meta, void* const* ptrs), see the .cpp
    "kvpack_kivi_key_scores": None,
    "kvpack_value_weighted_sum": None,
    "kvpack_qjl_key_scores": ctypes.c_int,
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


def _inner(t: torch.Tensor, dims: int) -> torch.Tensor:
    return t if _inner_contiguous(t, dims) else t.contiguous()


# --- what each kernel trusts ------------------------------------------------------------------------------
# One check per kernel, run before any pointer is handed to the C++ (by the public wrappers below and by the
# dispatcher in kvpack.kernels, which then calls the unchecked implementation). A check raises TypeError /
# ValueError for inputs no backend can take (wrong types, ranks or shapes that disagree: the C++ would read
# outside the buffers), and returns a reason string for well-formed inputs that only the reference takes
# (another device or dtype); None means the fast kernel may run. Sizes the C++ keeps in 32-bit ints are
# bounded; index tensors the C++ dereferences are range-checked by the C++ itself (a flag, no branch cost).
_INT32 = 2**31 - 1


def _tensors(**named) -> None:
    """Each ``name=(tensor, rank)`` is a dense torch.Tensor of that rank."""
    for name, (x, rank) in named.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
        if x.dim() != rank:
            raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(x.shape)}")


def _same(name: str, got, want, what: str) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"{name} {what} {tuple(got)} do not match the expected {tuple(want)}")


def _check_bits(bits, allowed: tuple) -> None:
    if type(bits) is not int or bits not in allowed:
        raise ValueError(f"bits must be one of {allowed}, got {bits!r}")


def _small(**sizes) -> None:
    for name, value in sizes.items():
        if value > _INT32:
            raise ValueError(f"{name} = {value} exceeds the kernels' 32-bit limit")


def _not_cpu(*tensors) -> str | None:
    for t in tensors:
        if t.device.type != "cpu":
            return f"device {t.device.type} (fast kernels run on CPU)"
    return None


def _scale_reason(scale, zero=None, what="scale/zero") -> str | None:
    if scale.dtype not in _SCALE_TYPES or (zero is not None and zero.dtype != scale.dtype):
        dtypes = scale.dtype if zero is None else f"{scale.dtype}/{zero.dtype}"
        return f"{what} dtypes {dtypes} (fast kernels take float32, float16, bfloat16)"
    return None


def _codes_reason(codes) -> str | None:
    return None if codes.dtype == torch.uint8 else f"codes dtype {codes.dtype} (expected uint8)"


def _check_kivi_key_scores(query, codes, scale, zero, bits) -> str | None:
    _tensors(query=(query, 4), codes=(codes, 5), scale=(scale, 4), zero=(zero, 4))
    _check_bits(bits, _QUANT_BITS)
    batch, heads, rows, dim = query.shape
    _same("codes", codes.shape[:2] + codes.shape[3:4], (batch, heads, dim), "(batch, heads, head_dim)")
    _same("scale", scale.shape, codes.shape[:4], "shape")
    _same("zero", zero.shape, scale.shape, "shape")
    group = codes.shape[-1] * 8 // bits
    _small(rows=rows, head_dim=dim, group=group)
    if bits not in _BITS:
        return f"bits={bits} (fast kernels take {_BITS})"
    if group % 8:
        return f"group_size {group} (fast kernels need a multiple of 8)"
    return (_not_cpu(query, codes, scale, zero) or _codes_reason(codes) or _scale_reason(scale, zero)
            or (None if query.dtype == torch.float32 else f"query dtype {query.dtype} (expected float32)"))  # fmt: skip


def _check_value_weighted_sum(weights, codes, scale, zero, bits, group_size) -> str | None:
    _tensors(weights=(weights, 4), codes=(codes, 4), scale=(scale, 4), zero=(zero, 4))
    _check_bits(bits, _QUANT_BITS)
    if type(group_size) is not int or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    batch, heads, rows, tokens = weights.shape
    _same("codes", codes.shape[:3], (batch, heads, tokens), "(batch, heads, tokens)")
    _same("scale", scale.shape[:3], (batch, heads, tokens), "(batch, heads, tokens)")
    _same("zero", zero.shape, scale.shape, "shape")
    dim = scale.shape[-1] * group_size
    if dim * bits % 8 or codes.shape[-1] != dim * bits // 8:
        raise ValueError(f"codes hold {codes.shape[-1]} bytes per token; {dim} channels at {bits} bits need {dim * bits / 8}")
    _small(rows=rows, head_dim=dim, group_size=group_size)
    if bits not in _BITS:
        return f"bits={bits} (fast kernels take {_BITS})"
    if group_size % 8:
        return f"group_size {group_size} (fast kernels need a multiple of 8)"
    return (_not_cpu(weights, codes, scale, zero) or _codes_reason(codes) or _scale_reason(scale, zero)
            or (None if weights.dtype == torch.float32 else f"weights dtype {weights.dtype} (expected float32)"))  # fmt: skip


def _check_qjl_key_scores(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms) -> str | None:
    _tensors(query=(query, 4), sketch=(sketch, 2), outlier_idx=(outlier_idx, 4), signs=(signs, 5), norms=(norms, 4),
             outlier_signs=(outlier_signs, 5), outlier_norms=(outlier_norms, 4))  # fmt: skip
    batch, heads, rows, dim = query.shape
    _same("signs", signs.shape[:2], (batch, heads), "(batch, heads)")
    n_groups, group = signs.shape[2], signs.shape[3]
    m, m_o, k = signs.shape[-1] * 8, outlier_signs.shape[-1] * 8, outlier_idx.shape[-1]
    _same("sketch", sketch.shape, (m, dim), "shape (sketch rows, head_dim)")
    _same("outlier_idx", outlier_idx.shape[:3], (batch, heads, n_groups), "(batch, heads, groups)")
    _same("norms", norms.shape, signs.shape[:4], "shape")
    _same("outlier_signs", outlier_signs.shape[:4], signs.shape[:4], "(batch, heads, groups, group)")
    _same("outlier_norms", outlier_norms.shape, signs.shape[:4], "shape")
    if k > dim or m_o > m:
        raise ValueError(f"{k} outlier channels of head_dim {dim}, or an outlier sketch of {m_o} > {m} rows")
    if outlier_idx.is_floating_point() or outlier_idx.dtype == torch.bool or outlier_idx.is_complex():
        raise TypeError(f"outlier_idx must be an integer tensor, got {outlier_idx.dtype}")
    _small(rows=rows, head_dim=dim, group=group, sketch_dim=m)
    if reason := _not_cpu(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms):
        return reason
    if query.dtype != torch.float32 or sketch.dtype != torch.float32:
        return f"query/sketch dtypes {query.dtype}/{sketch.dtype} (expected float32)"
    if outlier_idx.dtype != torch.uint8:
        return f"outlier_idx dtype {outlier_idx.dtype} (fast kernels take uint8, head_dim <= 256)"
    if signs.dtype != torch.uint8 or outlier_signs.dtype != torch.uint8:
        return f"sign dtypes {signs.dtype}/{outlier_signs.dtype} (expected uint8)"
    return _scale_reason(norms, outlier_norms, "norm")


def _check_turbo(kernel, rows, codes, scale, codebook, bits) -> str | None:
    name = "query_rotated" if kernel == "turbo_key_scores" else "weights"
    _tensors(**{name: (rows, 4)}, codes=(codes, 4), scale=(scale, 3), codebook=(codebook, 1))
    _check_bits(bits, _QUANT_BITS)
    batch, heads, n_rows, last = rows.shape
    tokens = codes.shape[2] if kernel == "turbo_key_scores" else last
    if codes.shape[:3] != (batch, heads, tokens) or scale.shape != (batch, heads, tokens):
        raise ValueError(
            f"codes {tuple(codes.shape)} and scale {tuple(scale.shape)} do not match {batch} batch, {heads} heads "
            f"and {tokens} tokens"
        )
    dim = last if kernel == "turbo_key_scores" else codes.shape[-1] * 8 // bits
    if codes.shape[-1] * 8 != dim * bits:
        raise ValueError(f"head_dim {dim} at {bits} bits does not fill the {codes.shape[-1]} code bytes")
    if codebook.shape != (2**bits,):
        raise ValueError(f"codebook shape {tuple(codebook.shape)} (expected ({2**bits},))")
    _small(rows=n_rows, head_dim=dim)
    if reason := _not_cpu(rows, codes, scale, codebook) or _codes_reason(codes):
        return reason
    if scale.dtype not in _SCALE_TYPES:
        return f"scale dtype {scale.dtype} (fast kernels take float32, float16, bfloat16)"
    if rows.dtype != torch.float32 or codebook.dtype != torch.float32:
        return f"query/weights and codebook dtypes {rows.dtype}/{codebook.dtype} (expected float32)"
    return None


def _check_quantize(x, bits, group_size, scale_dtype) -> str | None:
    _tensors(x=(x, 4))
    if scale_dtype is not None and not isinstance(scale_dtype, torch.dtype):
        raise TypeError(f"scale_dtype must be a torch.dtype or None, got {scale_dtype!r}")
    if reason := _not_cpu(x):
        return reason
    if x.dtype not in _SCALE_TYPES:
        return f"input dtype {x.dtype} (fast kernels take float32, float16, bfloat16)"
    if (scale_dtype or x.dtype) not in _SCALE_TYPES:
        return f"scale dtype {scale_dtype}"
    return None


def _check_pack_signs(x) -> str | None:
    if not isinstance(x, torch.Tensor) or x.layout != torch.strided or x.dim() < 1:
        raise TypeError(f"pack_signs takes a dense tensor of at least one dimension, got {x!r:.80}")
    _small(sketch_dim=x.shape[-1])
    if reason := _not_cpu(x):
        return reason
    return None if x.dtype == torch.float32 else f"input dtype {x.dtype} (expected float32)"


_CHECKS = {
    "kivi_key_scores": _check_kivi_key_scores,
    "value_weighted_sum": _check_value_weighted_sum,
    "qjl_key_scores": _check_qjl_key_scores,
    "turbo_key_scores": lambda *args: _check_turbo("turbo_key_scores", *args),
    "turbo_weighted_sum": lambda *args: _check_turbo("turbo_weighted_sum", *args),
    "quantize_pack_tokens": _check_quantize,
    "quantize_pack_key_groups": _check_quantize,
    "pack_signs": _check_pack_signs,
}


def unsupported(kernel: str, *args) -> str | None:
    """Why ``kernel`` cannot run fast on these arguments (another device or dtype), or ``None``.

    Raises:
        TypeError, ValueError: the arguments are malformed for any backend (see the checks above).
        KeyError: unknown kernel.
    """
    return _CHECKS[kernel](*args)


def _checked(kernel: str, args: tuple) -> None:
    """The public wrappers' guard: malformed input raises, input only the reference takes raises too."""
    reason = _CHECKS[kernel](*args)
    if reason is not None:
        from . import KernelUnavailableError

        raise KernelUnavailableError(f"{kernel}: the fast CPU kernel cannot run on this input: {reason}")


# --- unchecked implementations (the dispatcher calls these after `unsupported`) ---------------------------
def _kivi_key_scores(query, codes, scale, zero, bits):
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


def _value_weighted_sum(weights, codes, scale, zero, bits, group_size):
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


def _qjl_key_scores(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms):
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
    if _call("kvpack_qjl_key_scores", meta, tensors):
        raise ValueError(f"outlier_idx holds channel indices outside [0, {dim}) (head_dim)")
    return out


def _turbo_key_scores(query_rotated, codes, scale, codebook, bits):
    batch, heads, rows, dim = query_rotated.shape
    tokens = codes.shape[2]
    if query_rotated.stride(-1) != 1:
        query_rotated = query_rotated.contiguous()
    codes, codebook = _inner(codes, 1), codebook.contiguous()
    out = torch.empty(batch, heads, rows, tokens, dtype=torch.float32)
    if out.numel() == 0:
        return out.zero_()
    meta = [*query_rotated.stride(), *codes.stride()[:3], *scale.stride(), _SCALE_TYPES[scale.dtype],
            batch, heads, rows, tokens, dim, bits, torch.get_num_threads()]  # fmt: skip
    _call("kvpack_turbo_key_scores", meta, [query_rotated, codes, scale, codebook, out])
    return out


def _turbo_weighted_sum(weights, codes, scale, codebook, bits):
    batch, heads, rows, tokens = weights.shape
    dim = codes.shape[-1] * 8 // bits
    if weights.stride(-1) != 1:
        weights = weights.contiguous()
    codes, codebook = _inner(codes, 1), codebook.contiguous()
    out = torch.empty(batch, heads, rows, dim, dtype=torch.float32)
    if tokens == 0 or out.numel() == 0:
        return out.zero_()
    meta = [*weights.stride(), *codes.stride()[:3], *scale.stride(), _SCALE_TYPES[scale.dtype],
            batch, heads, rows, tokens, dim, bits, torch.get_num_threads()]  # fmt: skip
    _call("kvpack_turbo_weighted_sum", meta, [weights, codes, scale, codebook, out])
    return out


def _quantize_pack_tokens(values, bits, group_size, scale_dtype=None):
    from . import reference

    batch, heads, tokens, dim = values.shape
    if type(bits) is not int or bits not in _QUANT_BITS or type(group_size) is not int or group_size <= 0 \
            or dim % group_size or values.numel() == 0:  # fmt: skip
        return reference.quantize_pack_tokens(values, bits, group_size, scale_dtype)  # raises, or trivial
    _small(head_dim=dim, group_size=group_size)
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


def _quantize_pack_key_groups(keys, bits, group_size, scale_dtype=None):
    from . import reference

    batch, heads, tokens, dim = keys.shape
    if type(bits) is not int or bits not in _QUANT_BITS or type(group_size) is not int or group_size <= 0 \
            or tokens % group_size or keys.numel() == 0:  # fmt: skip
        return reference.quantize_pack_key_groups(keys, bits, group_size, scale_dtype)  # raises, or trivial
    _small(head_dim=dim, group_size=group_size)
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


def _pack_signs(x):
    m = x.shape[-1]
    out = torch.empty(x.shape[:-1] + ((m + 7) // 8,), dtype=torch.uint8)
    if out.numel() == 0:
        return out
    rows = x.reshape(-1, m)  # a view when x's leading axes are mergeable, else one copy
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    _call("kvpack_pack_signs", [rows.stride(0), rows.shape[0], m, torch.get_num_threads()], [rows, out])
    return out


IMPLEMENTATIONS = {
    "kivi_key_scores": _kivi_key_scores,
    "value_weighted_sum": _value_weighted_sum,
    "qjl_key_scores": _qjl_key_scores,
    "turbo_key_scores": _turbo_key_scores,
    "turbo_weighted_sum": _turbo_weighted_sum,
    "quantize_pack_tokens": _quantize_pack_tokens,
    "quantize_pack_key_groups": _quantize_pack_key_groups,
    "pack_signs": _pack_signs,
}


# --- public, checked entry points ---------------------------------------------------------------------------
def kivi_key_scores(query, codes, scale, zero, bits):
    """Fused :func:`kvpack.kernels.reference.kivi_key_scores` (same arguments and result).

    Raises:
        TypeError, ValueError: malformed inputs (shapes that disagree, wrong ranks or types).
        KernelUnavailableError: well-formed inputs this kernel does not take (device, dtype, bits).
    """
    _checked("kivi_key_scores", (query, codes, scale, zero, bits))
    return _kivi_key_scores(query, codes, scale, zero, bits)


def value_weighted_sum(weights, codes, scale, zero, bits, group_size):
    """Fused :func:`kvpack.kernels.reference.value_weighted_sum`; raises as :func:`kivi_key_scores`."""
    _checked("value_weighted_sum", (weights, codes, scale, zero, bits, group_size))
    return _value_weighted_sum(weights, codes, scale, zero, bits, group_size)


def qjl_key_scores(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms):
    """Fused :func:`kvpack.kernels.reference.qjl_key_scores`; raises as :func:`kivi_key_scores`, and
    ``ValueError`` for an outlier channel index >= head_dim."""
    args = (query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms)
    _checked("qjl_key_scores", args)
    return _qjl_key_scores(*args)


def turbo_key_scores(query_rotated, codes, scale, codebook, bits):
    """Fused :func:`kvpack.kernels.reference.turbo_key_scores`; raises as :func:`kivi_key_scores`."""
    _checked("turbo_key_scores", (query_rotated, codes, scale, codebook, bits))
    return _turbo_key_scores(query_rotated, codes, scale, codebook, bits)


def turbo_weighted_sum(weights, codes, scale, codebook, bits):
    """Fused :func:`kvpack.kernels.reference.turbo_weighted_sum`; raises as :func:`kivi_key_scores`."""
    _checked("turbo_weighted_sum", (weights, codes, scale, codebook, bits))
    return _turbo_weighted_sum(weights, codes, scale, codebook, bits)


def quantize_pack_tokens(values, bits, group_size, scale_dtype=None):
    """Fused :func:`kvpack.kernels.reference.quantize_pack_tokens`: bit-identical outputs, same errors."""
    _checked("quantize_pack_tokens", (values, bits, group_size, scale_dtype))
    return _quantize_pack_tokens(values, bits, group_size, scale_dtype)


def quantize_pack_key_groups(keys, bits, group_size, scale_dtype=None):
    """Fused :func:`kvpack.kernels.reference.quantize_pack_key_groups`: bit-identical outputs, same errors."""
    _checked("quantize_pack_key_groups", (keys, bits, group_size, scale_dtype))
    return _quantize_pack_key_groups(keys, bits, group_size, scale_dtype)


def pack_signs(x):
    """Fused :func:`kvpack.kernels.reference.pack_signs`: bit-identical outputs."""
    _checked("pack_signs", (x,))
    return _pack_signs(x)
