"""The kernel ops three ways, by name, for the kernel tests: ``dispatch.<name>`` (the op under the backend
in force), ``fast.<name>`` (the fast CPU kernel forced: raises where it cannot run, never falls back) and
``reference.<name>`` (the pure-torch oracle of the method that owns the kernel)."""

from __future__ import annotations

import torch

import kvpack  # noqa: F401  (registers every method's kernels)
from kvpack import KIVIConfig, QJLConfig, TurboConfig, kernels, make_layer

#: Absolute slack of the 2x rule (:func:`assert_close_to_exact`).
ATOL = 1e-5


class _Namespace:
    def __init__(self, wrap):
        self._wrap = wrap

    def __getattr__(self, name: str):
        try:
            kernel = kernels.registered()[name]
        except KeyError:
            raise AttributeError(name) from None
        return self._wrap(kernel)


def _forced(kernel):
    def run(*args):
        with kernels.use("fast"):
            return kernel(*args)

    return run


dispatch = _Namespace(lambda kernel: kernel)
fast = _Namespace(_forced)
reference = _Namespace(lambda kernel: kernel.reference)


def decode_sample(config, dim: int = 64, batch: int = 1, tokens: int = 40):
    """A decode op's arguments (``layer._decode_args``) from a layer holding packed rows, the block its last
    append flushed (pending), fp tokens, with a padding mask over the first 3 tokens."""
    gen = torch.Generator().manual_seed(0)
    layer = make_layer(config)
    layer.append(torch.randn(batch, 2, tokens, dim, generator=gen), torch.randn(batch, 2, tokens, dim, generator=gen))
    mask = torch.zeros(batch, 2, 3, layer.num_tokens)
    mask[..., :3] = float("-inf")
    return layer._decode_args(torch.randn(batch, 2, 3, dim, generator=gen), mask, dim**-0.5)


def to_meta(a):
    """``a`` on the meta device: tensors, and the tensors inside lists."""
    if isinstance(a, list):
        return [to_meta(x) for x in a]
    return a.to("meta") if isinstance(a, torch.Tensor) else a


def assert_close_to_exact(fast, ref, exact):
    """|fast - exact| <= 2 |ref - exact| (worst case over the tensor) + ATOL: a kernel within twice the
    reference's own error of the exact result (flash-attention's rule)."""
    assert fast.shape == ref.shape == exact.shape, (fast.shape, ref.shape, exact.shape)
    assert fast.dtype == torch.float32, fast.dtype
    if exact.numel() == 0:
        return
    ref_err = (ref.double() - exact).abs().max().item()
    fast_err = (fast.double() - exact).abs().max().item()
    assert fast_err <= 2 * ref_err + ATOL, f"fast error {fast_err:.3g} vs reference error {ref_err:.3g}"


# --- the fused decode step ---------------------------------------------------------------------------------
DECODE_CONFIGS = [
    KIVIConfig(residual_length=32),
    KIVIConfig(key_bits=4, value_bits=8, group_size=16, residual_length=32, scale_dtype="bfloat16"),
    QJLConfig(residual_length=32),
    QJLConfig(outlier_channels=0, residual_length=32, scale_dtype="float32"),
    TurboConfig(residual_length=32),
    TurboConfig(key_bits=4, value_bits=1, group_size=16, residual_length=32),
]
DECODE_IDS = ("kivi2", "kivi4-8-g16-bf16", "qjl", "qjl-plain-f32", "turbo", "turbo4-1-g16")


def exact_attention(layer, query, mask, scale):
    """float64 attention over what the step reads (layer.materialize), GQA, an additive or bool mask."""
    keys, values = (x.double() for x in layer.materialize())
    rep = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
    scores = query.double() @ keys.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return (torch.softmax(scores, -1).nan_to_num(0.0) @ values).float()


def decode_layer(config, batch, tokens, dtype=torch.float32, steps=3, seed=0, dim=64, device="cpu"):
    """A layer (3 kv heads) after a ``tokens``-token prompt and ``steps`` decode appends (the last may leave a
    pending flush); the same draws on every device."""
    gen = torch.Generator().manual_seed(seed)
    layer = make_layer(config)
    layer.append(*(torch.randn(batch, 3, tokens, dim, generator=gen).to(device, dtype) for _ in range(2)))
    for _ in range(steps):
        layer.append(*(torch.randn(batch, 3, 1, dim, generator=gen).to(device, dtype) for _ in range(2)))
    return layer


def filled_layer(config, keys, values, prompt=70):
    """A layer fed ``prompt`` tokens at once, then the rest of ``keys``/``values`` one by one (decode steps)."""
    from kvpack import make_layer

    layer = make_layer(config)
    layer.append(keys[:, :, :prompt], values[:, :, :prompt])
    for t in range(prompt, keys.shape[2]):
        layer.append(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    return layer
