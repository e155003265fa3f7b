"""Workbench: candidate implementations of the fused KIVI decode kernels, side by side (llm.c dev/ style).

Compares, on one decode step of one layer (query rows grouped per kv head, as kvpack calls the kernels):

* ``reference``   the pure-torch oracle in kvpack.methods.kivi.reference (unpack, dequantize, matmul);
* ``compile``     torch.compile (inductor, C++ backend) of the reference math, static shapes;
* ``numba``       a numba ``parallel=True`` kernel with the same loop structure as the C++ one;
* ``cpp``         kvpack.methods.kivi.cpu (the promoted winner: plain C++ with AVX2 intrinsics, via ctypes);

and float32 SDPA over the uncompressed cache as the baseline. Each candidate is checked against the
reference before it is timed. Also reports first-use cost: C++ build (fresh cache folder, in a child
process), numba compile, torch.compile compile.

    python benchmarks/kernel_workbench.py [--batch 8] [--tokens 8192] [--bits 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from kvpack.methods.kivi import cpu, reference
from kvpack.primitives import pack_bits, quantize_affine, unpack_bits


def best_ms(fn, repeat=10):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def make_inputs(batch, heads, tokens, dim, group, bits, rows, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, tokens // group, dim, group, generator=gen)
    codes, scale, zero = quantize_affine(keys, bits, group, -1, torch.float16)
    key_codes, key_scale, key_zero = pack_bits(codes, bits, -1), scale.squeeze(-1), zero.squeeze(-1)
    values = torch.randn(batch, heads, tokens, dim, generator=gen)
    codes, value_scale, value_zero = quantize_affine(values, bits, group, -1, torch.float16)
    value_codes = pack_bits(codes, bits, -1)
    query = torch.randn(batch, heads, rows, dim, generator=gen)
    weights = torch.softmax(torch.randn(batch, heads, rows, tokens, generator=gen), -1)
    return (query, key_codes, key_scale, key_zero), (weights, value_codes, value_scale, value_zero)


# --- torch.compile candidate ----------------------------------------------------------------------------
def compiled_kernels(bits, group):
    @torch.compile(dynamic=False)
    def keys(query, codes, scale, zero):
        k = unpack_bits(codes, bits, group).float() * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
        return torch.einsum("bhmd,bhndg->bhmng", query, k).flatten(3)

    @torch.compile(dynamic=False)
    def values(weights, codes, scale, zero):
        dim = scale.shape[-1] * group
        v = unpack_bits(codes, bits, dim).float().unflatten(-1, (-1, group))
        v = (v * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).flatten(-2)
        return weights @ v

    return keys, values


# --- numba candidate ------------------------------------------------------------------------------------
def numba_kernels():
    from numba import njit, prange

    @njit(parallel=True, fastmath=True, cache=True)
    def keys(query, codes, scale, zero, bits, out):  # query (BH, M, D); codes (BH, N, D, GB); scale (BH, N, D) f32
        heads, rows, dim = query.shape
        n_groups, group_bytes = codes.shape[1], codes.shape[3]
        per = 8 // bits
        mask = (1 << bits) - 1
        group = group_bytes * per
        for bh in prange(heads):
            qs = np.empty((dim, rows), np.float32)
            acc = np.empty((rows, group), np.float32)
            zterm = np.empty(rows, np.float32)
            for n in range(n_groups):
                zterm[:] = 0
                for d in range(dim):
                    for m in range(rows):
                        qs[d, m] = query[bh, m, d] * scale[bh, n, d]
                        zterm[m] += query[bh, m, d] * zero[bh, n, d]
                acc[:] = 0
                for d in range(dim):
                    for j in range(group_bytes):
                        byte = codes[bh, n, d, j]
                        for s in range(per):
                            code = np.float32((byte >> (s * bits)) & mask)
                            for m in range(rows):
                                acc[m, j * per + s] += qs[d, m] * code
                for m in range(rows):
                    for t in range(group):
                        out[bh, m, n * group + t] = acc[m, t] + zterm[m]

    @njit(parallel=True, fastmath=True, cache=True)
    def values(weights, codes, scale, zero, bits, group, out):  # weights (BH, M, T); codes (BH, T, DB)
        heads, rows, tokens = weights.shape
        dim_bytes = codes.shape[2]
        per = 8 // bits
        mask = (1 << bits) - 1
        for bh in prange(heads):
            acc = np.zeros((rows, dim_bytes * per), np.float32)
            for t in range(tokens):
                for j in range(dim_bytes):
                    byte = codes[bh, t, j]
                    g = j * per // group
                    for s in range(per):
                        code = np.float32((byte >> (s * bits)) & mask)
                        for m in range(rows):
                            acc[m, j * per + s] += weights[bh, m, t] * (code * scale[bh, t, g] + zero[bh, t, g])
            out[bh] = acc

    def call_keys(query, codes, scale, zero, bits):
        b, h, m, d = query.shape
        n, gb = codes.shape[2], codes.shape[-1]
        out = torch.empty(b * h, m, n * gb * 8 // bits)
        keys(query.reshape(b * h, m, d).numpy(), codes.reshape(b * h, n, d, gb).numpy(),
             scale.float().reshape(b * h, n, d).numpy(), zero.float().reshape(b * h, n, d).numpy(), bits,
             out.numpy())  # fmt: skip
        return out.reshape(b, h, m, -1)

    def call_values(weights, codes, scale, zero, bits, group):
        b, h, m, t = weights.shape
        out = torch.empty(b * h, m, codes.shape[-1] * 8 // bits)
        values(weights.reshape(b * h, m, t).numpy(), codes.reshape(b * h, t, -1).numpy(),
               scale.float().reshape(b * h, t, -1).numpy(), zero.float().reshape(b * h, t, -1).numpy(), bits, group,
               out.numpy())  # fmt: skip
        return out.reshape(b, h, m, -1)

    return call_keys, call_values


def cpp_build_seconds() -> float:
    """Build the C++ library into a fresh cache folder in a child process; seconds taken."""
    with tempfile.TemporaryDirectory() as tmp:
        code = "import time,kvpack.kernels.native as c; t=time.perf_counter(); c.load(); print(time.perf_counter()-t)"
        env = dict(os.environ, KVPACK_CACHE=tmp)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--rows", type=int, default=3, help="query rows per kv head (GQA ratio x query tokens)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], help="candidates to skip (compile, numba, cpp)")
    args = parser.parse_args()
    torch.manual_seed(0)
    key_args, value_args = make_inputs(args.batch, args.heads, args.tokens, args.dim, args.group, args.bits, args.rows)
    print(f"batch {args.batch}, {args.heads} kv heads x {args.rows} query rows, {args.tokens} tokens, "
          f"head_dim {args.dim}, {args.bits}-bit, group {args.group}, {torch.get_num_threads()} threads")  # fmt: skip

    want_keys = reference.kivi_key_scores(*key_args, args.bits)
    want_values = reference.value_weighted_sum(*value_args, args.bits, args.group)
    candidates = {"reference": (reference.kivi_key_scores, reference.value_weighted_sum)}
    first_use = {}
    if "compile" not in args.skip:
        tc_keys, tc_values = compiled_kernels(args.bits, args.group)
        start = time.perf_counter()
        tc_keys(*key_args), tc_values(*value_args)
        first_use["compile (torch.compile, warm inductor cache if any)"] = time.perf_counter() - start
        candidates["compile"] = (lambda *a: tc_keys(*a[:4]), lambda *a: tc_values(*a[:4]))
    if "numba" not in args.skip:
        start = time.perf_counter()
        nb_keys, nb_values = numba_kernels()
        nb_keys(*key_args, args.bits), nb_values(*value_args, args.bits, args.group)
        first_use["numba (compile or load from cache)"] = time.perf_counter() - start
        candidates["numba"] = (nb_keys, nb_values)
    if "cpp" not in args.skip:
        first_use["cpp (fresh build, child process)"] = cpp_build_seconds()
        candidates["cpp"] = (cpu.kivi_key_scores_cpu, cpu.value_weighted_sum_cpu)  # inputs valid: no check needed

    for name, (keys, values) in candidates.items():
        got_keys = keys(*key_args, args.bits)
        got_values = values(*value_args, args.bits, args.group)
        assert torch.allclose(got_keys, want_keys, rtol=1e-4, atol=1e-3), name
        assert torch.allclose(got_values, want_values, rtol=1e-4, atol=1e-4), name

    batch, heads, rows, dim = key_args[0].shape
    k = torch.randn(batch, heads, args.tokens, dim)
    v = torch.randn(batch, heads, args.tokens, dim)
    q = torch.randn(batch, heads * rows, 1, dim)
    sdpa = best_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    print(f"{'float32 SDPA (GQA)':<28} {sdpa:9.2f} ms")
    for name, (keys, values) in candidates.items():
        repeat = 3 if name == "reference" else 10
        tk = best_ms(lambda: keys(*key_args, args.bits), repeat)
        tv = best_ms(lambda: values(*value_args, args.bits, args.group), repeat)
        print(
            f"{name:<12} keys {tk:8.2f} ms  values {tv:8.2f} ms  sum {tk + tv:8.2f} ms  {sdpa / (tk + tv):6.2f}x SDPA"
        )
    for name, seconds in first_use.items():
        print(f"first use: {name:<52} {seconds:6.1f} s")


if __name__ == "__main__":
    main()
