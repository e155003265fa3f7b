"""The kernel ops three ways, by name, for the kernel tests: ``dispatch.<name>`` (the op under the backend
in force), ``fast.<name>`` (the fast CPU kernel forced: raises where it cannot run, never falls back) and
``reference.<name>`` (the pure-torch oracle of the method that owns the kernel)."""

from __future__ import annotations

import torch

import kvpack  # noqa: F401  (registers every method's kernels)
from kvpack import kernels, make_layer


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
