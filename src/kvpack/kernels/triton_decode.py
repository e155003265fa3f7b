"""The Triton decode step's shared parts: the online-softmax tile, the fp-token loads, the split merge and the
launcher every method's fused decode kernel (``methods/<name>/triton.py``) runs through.

One launch per layer step computes, for the M grouped query rows of each (batch, kv head), ``softmax(scale *
q.K^T + mask) V`` over the packed rows and the fp tokens that follow them (the block this step's append
flushed and the residual or window), as the CPU step does (``kernels/csrc/decode.h``). Flash-decoding: the
grid is (batch x kv heads, query-row blocks, token splits); each program walks its split in tiles of G
tokens (one key group), unpacking each tile once for all the query rows of its kv head (GQA), with an online
softmax; a second small launch merges the splits' (max, sum, accumulator) when there is more than one.

A method's kernel takes, in this order: :func:`common_head`'s arguments, its own tensors and sizes,
the output and sizes :func:`launch` appends (``out, part_m, part_l, H, M, KQ, VQ, T, CHUNK, splits,
scale2``), then the constexprs ``D, BLOCK_M, HAS_MASK, SPLIT, DOT, EMULATE`` and its own; inside, it calls :func:`fp_rows`, :func:`scaled_scores`,
:func:`softmax_tile` and :func:`finish`.

Precision: products over the packed tiles run in the model's dtype (the fp tokens' dtype: fp16/bf16 on tensor
cores, float32 with IEEE products), accumulated in float32; the few tiles past the packed rows (the residual
and window, which hold the tokens exactly) take float32 IEEE products; scores, softmax and the output are
float32. Triton's CPU
interpreter computes bf16 products wrongly (numpy has no bf16) and its bf16 cast truncates, so there
:func:`dot` rounds the operands to the nearest bf16 itself and multiplies in float32 (what the GPU's
round-to-nearest casts and bf16 tensor-core products give, up to the order of the float32 sums).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from . import gpu

__all__ = [
    "LOG2E",
    "attend_tile",
    "common_head",
    "dot",
    "program",
    "finish",
    "fp_rows",
    "launch",
    "scaled_scores",
    "softmax_tile",
]

LOG2E = 1.4426950408889634
#: ``DOT`` codes: the dtype products run in.
DOT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: Programs to aim for (x the GPU's multiprocessors): enough splits to feed every SM at batch 1.
WAVES = 2
#: A split holds at least this many tiles (fewer would cost more in the merge than they save).
MIN_TILES = 4


@triton.jit
def round_bf16(x):
    """float32 -> the nearest bfloat16 (ties to even), as float32: the interpreter's own cast truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def program(H, T, CHUNK, BLOCK_M: tl.constexpr, D: tl.constexpr, G: tl.constexpr):
    """This program's place in the grid: (bh, split, b, h, query rows om, channels od, tile tokens oj, its
    split's first token and end), then the empty softmax state (max, sum, accumulator)."""
    bh = tl.program_id(0)
    split = tl.program_id(2)
    start = split * CHUNK
    om = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    return (bh, split, (bh // H).to(tl.int64), (bh % H).to(tl.int64), om, tl.arange(0, D), tl.arange(0, G), start,
            tl.minimum(start + CHUNK, T), tl.full([BLOCK_M], float("-inf"), tl.float32),
            tl.zeros([BLOCK_M], tl.float32), tl.zeros([BLOCK_M, D], tl.float32))  # fmt: skip


@triton.jit
def dot(a, b, DOT: tl.constexpr, EMULATE: tl.constexpr):
    """``a @ b`` accumulated in float32, the operands rounded to the ``DOT`` dtype (0 f32, 1 f16, 2 bf16)."""
    if DOT == 0:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT == 1:
        out = tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif EMULATE:
        out = tl.dot(round_bf16(a.to(tl.float32)), round_bf16(b.to(tl.float32)), input_precision="ieee")
    else:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    return out


@triton.jit
def fp_rows(p0, s0b, s0h, s0l, n0, p1, s1b, s1h, s1l, n1, p2, s2b, s2h, s2l, n2, b, h, idx, od):
    """fp tokens ``idx`` (BN,) of the three chunks read one after the other -> (BN, D) float32, 0 outside
    ``[0, n0 + n1 + n2)``; ``od`` (D,) the channels (last axis contiguous)."""
    in0 = (idx >= 0) & (idx < n0)
    in1 = (idx >= n0) & (idx < n0 + n1)
    in2 = (idx >= n0 + n1) & (idx < n0 + n1 + n2)
    x0 = tl.load(p0 + b * s0b + h * s0h + idx[:, None] * s0l + od[None, :], mask=in0[:, None], other=0.0)
    x1 = tl.load(p1 + b * s1b + h * s1h + (idx - n0)[:, None] * s1l + od[None, :], mask=in1[:, None], other=0.0)
    x2 = tl.load(p2 + b * s2b + h * s2h + (idx - n0 - n1)[:, None] * s2l + od[None, :], mask=in2[:, None], other=0.0)
    return tl.where(in0[:, None], x0.to(tl.float32), tl.where(in1[:, None], x1.to(tl.float32), x2.to(tl.float32)))


@triton.jit
def scaled_scores(s, mask, m_sb, m_sh, m_sm, b, h, om, M, t, end, scale2, HAS_MASK: tl.constexpr):
    """Raw scores (BM, BN) -> log2-domain logits: ``s * scale * log2(e) + mask * log2(e)``, -inf at tokens
    ``t >= end``."""
    valid = t < end
    s = s * scale2
    if HAS_MASK:
        where = (om < M)[:, None] & valid[None, :]
        add = tl.load(mask + b * m_sb + h * m_sh + om[:, None] * m_sm + t[None, :], mask=where, other=0.0)
        s = s + add * 1.4426950408889634
    return tl.where(valid[None, :], s, float("-inf"))


@triton.jit
def softmax_tile(s, v, m_i, l_i, acc, DOT: tl.constexpr, EMULATE: tl.constexpr):
    """One online-softmax step: logits ``s`` (BM, BN), values ``v`` (BN, D) -> the updated (max, sum, acc).
    Rows whose logits are all -inf so far keep max -inf and add nothing (no NaN from -inf - -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p, v, DOT, EMULATE)
    return m_new, l_i, acc


@triton.jit
def attend_tile(s, values, m_i, l_i, acc, mask, m_sb, m_sh, m_sm, b, h, om, M, t, end, scale2,
                HAS_MASK: tl.constexpr, DOT: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """:func:`scaled_scores` then :func:`softmax_tile`: one tile of raw scores (BM, BN) and values (BN, D)."""
    s = scaled_scores(s, mask, m_sb, m_sh, m_sm, b, h, om, M, t, end, scale2, HAS_MASK)
    return softmax_tile(s, values, m_i, l_i, acc, DOT, EMULATE)


@triton.jit
def finish(acc, m_i, l_i, out, part_m, part_l, bh, split, splits, om, od, M, D: tl.constexpr,
           SPLIT: tl.constexpr, HAS_MASK: tl.constexpr):  # fmt: skip
    """Store a program's result: its split's (max, sum, accumulator) for :func:`_merge`, or, unsplit, the
    normalized rows (0 for a masked row with nothing to attend, NaN without a mask, as the reference)."""
    rows = om < M
    if SPLIT:
        base = (bh * splits + split).to(tl.int64) * M
        tl.store(part_m + base + om, m_i, mask=rows)
        tl.store(part_l + base + om, l_i, mask=rows)
        tl.store(out + (base + om)[:, None] * D + od[None, :], acc, mask=rows[:, None])
    else:
        if HAS_MASK:  # a row with nothing to attend: 0
            result = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        else:
            result = acc / l_i[:, None]
        tl.store(out + (bh.to(tl.int64) * M + om)[:, None] * D + od[None, :], result, mask=rows[:, None])


@triton.jit
def _merge(part_acc, part_m, part_l, out, splits, M, D: tl.constexpr, BLOCK_M: tl.constexpr,
           HAS_MASK: tl.constexpr):  # fmt: skip
    bh = tl.program_id(0)
    om = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    od = tl.arange(0, D)
    rows = om < M
    m_all = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_all = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for split in range(0, splits):
        base = (bh * splits + split).to(tl.int64) * M
        m_s = tl.load(part_m + base + om, mask=rows, other=float("-inf"))
        l_s = tl.load(part_l + base + om, mask=rows, other=0.0)
        a_s = tl.load(part_acc + (base + om)[:, None] * D + od[None, :], mask=rows[:, None], other=0.0)
        m_new = tl.maximum(m_all, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        old, new = tl.exp2(m_all - m_use), tl.exp2(m_s - m_use)
        l_all = l_all * old + l_s * new
        acc = acc * old[:, None] + a_s * new[:, None]
        m_all = m_new
    if HAS_MASK:
        result = tl.where(l_all[:, None] > 0, acc / tl.where(l_all > 0, l_all, 1.0)[:, None], 0.0)
    else:
        result = acc / l_all[:, None]
    tl.store(out + (bh.to(tl.int64) * M + om)[:, None] * D + od[None, :], result, mask=rows[:, None])


# --- the launcher ------------------------------------------------------------------------------------------
def _side(parts, query) -> list:
    """The fp chunks as (tensor, 3 strides, length) x 3; an absent chunk points at the query, never read."""
    args = []
    for x in parts:
        args += (x, *x.stride()[:3], x.shape[2])
    for _ in range(3 - len(parts)):
        args += (query, 0, 0, 0, 0)
    return args


def dot_type(key_fp, value_fp) -> tuple[int, bool]:
    """The products' dtype code (the model's: that of the fp tokens; float32 if none) and whether bf16
    products are emulated (Triton's interpreter)."""
    parts = [*value_fp, *key_fp]
    code = DOT_CODES[parts[0].dtype] if parts else 0
    return code, code == 2 and gpu.interpreting()


def _programs(device: torch.device) -> int:
    if device.type == "cuda":
        return WAVES * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so the tests exercise the merge


def chunk_tokens(parallel: int, tokens: int, block: int, programs: int) -> int:
    """Tokens per split (a multiple of ``block``): enough splits that ``parallel`` x splits programs cover
    ``programs``, none shorter than :data:`MIN_TILES` tiles."""
    want = max(1, programs // max(parallel, 1))
    chunk = -(-tokens // want)
    chunk = -(-chunk // block) * block
    return max(chunk, MIN_TILES * block)


def common_head(query, mask, key_fp, value_fp) -> list:
    """The arguments every decode kernel starts with: query, mask, the key and value fp chunks."""
    head = [query, *query.stride()[:3]]
    head += (query, 0, 0, 0) if mask is None else (mask, *mask.stride()[:3])
    return head + _side(key_fp, query) + _side(value_fp, query)


def launch(kernel, query, mask, key_fp, value_fp, key_quantized: int, value_quantized: int, scale: float,
           method_args: list, block_n: int, dot: tuple[int, bool] | None = None, **constexprs) -> torch.Tensor:  # fmt: skip
    """Run ``kernel`` over the grid and merge its splits: (B, H, M, D) float32 rows.

    ``query`` (B, H, M, D) float32, ``mask`` None or (B, H, M, T) additive; the fp chunks (B, H, L, D) of one
    dtype per side; ``method_args`` the kernel's own arguments; ``block_n`` its tile (key group) size;
    ``dot`` the products' dtype (default :func:`dot_type` of the fp chunks)."""
    batch, heads, rows, dim = query.shape
    tokens = value_quantized + sum(v.shape[2] for v in value_fp)
    if query.stride(-1) != 1:
        query = query.contiguous()
    if mask is not None and (mask.dtype != torch.float32 or mask.stride(-1) != 1):
        mask = mask.float().contiguous()
    dot_code, emulate = dot or dot_type(key_fp, value_fp)
    block_m = max(16, triton.next_power_of_2(min(rows, 64)))
    m_blocks = -(-rows // block_m)
    chunk = chunk_tokens(batch * heads * m_blocks, tokens, block_n, _programs(query.device))
    splits = -(-tokens // chunk)
    out = torch.empty(batch, heads, rows, dim, dtype=torch.float32, device=query.device)
    if splits > 1:
        part_acc = torch.empty(batch * heads, splits, rows, dim, dtype=torch.float32, device=query.device)
        part_m = torch.empty(batch * heads, splits, rows, dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
        target = (part_acc, part_m, part_l)
    else:
        target = (out, out, out)
    tail = [*target, heads, rows, key_quantized, value_quantized, tokens, chunk, splits, scale * LOG2E]
    flags = dict(D=dim, BLOCK_M=block_m, HAS_MASK=mask is not None, SPLIT=splits > 1, DOT=dot_code, EMULATE=emulate)
    with torch.cuda.device(query.device) if query.device.type == "cuda" else contextlib.nullcontext():
        kernel[(batch * heads, m_blocks, splits)](*common_head(query, mask, key_fp, value_fp), *method_args, *tail,
                                                  **flags, **constexprs)  # fmt: skip
        if splits > 1:
            _merge[(batch * heads, m_blocks)](part_acc, part_m, part_l, out, splits, rows, D=dim, BLOCK_M=block_m,
                                              HAS_MASK=mask is not None)  # fmt: skip
    return out


def reason(query, key_fp, value_fp, mask, group: int, tokens: int, tensors) -> str | None:
    """Why well-formed decode arguments cannot take a Triton kernel (shapes its tiles cannot cover, devices
    it does not run on), or None. ``tokens``: T; ``tensors``: every other tensor the kernel reads."""
    dim = query.shape[-1]
    device = query.device
    if reason := gpu.device_reason(device):
        return reason
    if any(t.device != device for t in tensors):
        return "tensors on several devices"
    if dim not in (16, 32, 64, 128, 256):
        return f"head_dim {dim} (the Triton kernels take 16, 32, 64, 128 or 256)"
    if group < 16 or group > 256 or group & (group - 1):
        return f"group_size {group} (the Triton kernels tile by a power-of-2 group of 16 to 256 tokens)"
    if query.dtype != torch.float32:
        return f"query dtype {query.dtype} (the decode step takes float32 rows)"
    if mask is not None and not mask.is_floating_point():
        return f"mask dtype {mask.dtype}"
    if math.prod(query.shape[:3]) == 0 or tokens == 0:
        return "nothing to attend"
    for x in (*key_fp, *value_fp):
        if x.stride(-1) != 1 and x.shape[2] > 0:
            return "fp tokens without a contiguous last axis"
    return None
