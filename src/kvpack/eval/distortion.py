"""Attention-score distortion per layer, on real activations.

One fp prefill of real text records, for every attention layer, the post-RoPE keys and values (from the
model's ``DynamicCache``) and the post-RoPE queries of the last M positions (hooks on the attention
modules: ``q_proj`` of the layer input, then the rotary embedding the model passes to the layer). Each
method then replays the layer as decoding does: a fresh ``kvpack.make_layer(config, layer_idx=i)`` takes
the first T - M tokens as a prompt, then the M last tokens one at a time; after each append the query of
that position is scored with ``layer.scores`` and compared with exact attention over the fp keys::

    p     = softmax(q . K[:t]^T * scale)            exact
    p_hat = softmax(layer.scores(q) * scale)        the method's estimate
    error = |p_hat - p|_2 / |p|_2                   per query row and head, averaged per layer

The recorded queries are checked against the model's own attention output (the layer's output projection
of exact attention must reproduce it), so an architecture whose queries the hooks do not reconstruct
raises instead of giving wrong numbers. Query reconstruction covers the Llama family (optionally with a
``q_norm``, as Qwen3 has); other models raise.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..config import MethodConfig
from ..registry import make_layer
from ._common import forward_last, full_layers, progress_bar

__all__ = ["AttentionCapture", "DistortionResult", "attention_distortion", "capture_attention"]


@dataclasses.dataclass
class AttentionCapture:
    """Real attention inputs of one prefill.

    Attributes:
        queries: per layer, (B, H_q, M, D) float32 post-RoPE queries of the last M positions.
        keys, values: per layer, (B, H_kv, T, D) post-RoPE keys and values of all T positions.
        scales: per layer, the softmax scale the model uses.
    """

    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    scales: list[float]
    #: The model's layer index of each entry (the full-attention layers: a sliding-window layer's cache does not
    #: hold every position, and its attention is not the full softmax this measures).
    layers: list[int] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[2]

    @property
    def num_queries(self) -> int:
        return self.queries[0].shape[2]


@dataclasses.dataclass
class DistortionResult:
    """Relative error of one method's attention weights, per layer (see the module docstring)."""

    label: str
    context: int
    queries: int
    per_layer: list[float]
    seconds: float
    #: The model's layer index of each ``per_layer`` entry (every layer in order unless some slide).
    layers: list[int] = dataclasses.field(default_factory=list)

    @property
    def worst_layer(self) -> int:
        """The model's index of the layer with the largest error."""
        k = max(range(len(self.per_layer)), key=self.per_layer.__getitem__)
        return self.layers[k] if self.layers else k

    @property
    def mean(self) -> float:
        return sum(self.per_layer) / len(self.per_layer)

    @property
    def max(self) -> float:
        return max(self.per_layer)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mean": self.mean, "max": self.max}


def _attention_modules(model) -> list[torch.nn.Module]:
    modules = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules with q_proj and layer_idx")
    return sorted(modules, key=lambda m: m.layer_idx)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _exact_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last M positions: query (B, H_q, M, D) over keys/values (B, H_kv, T, D)."""
    rep = query.shape[1] // keys.shape[1]
    keys = keys.float().repeat_interleave(rep, dim=1)
    values = values.float().repeat_interleave(rep, dim=1)
    m, t = query.shape[2], keys.shape[2]
    scores = query @ keys.transpose(-1, -2) * scale  # (B, H_q, M, T)
    causal = torch.ones(m, t, dtype=torch.bool).tril(t - m)
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ values  # (B, H_q, M, D)


@torch.no_grad()
def capture_attention(model, input_ids: torch.Tensor, queries: int = 32) -> AttentionCapture:
    """Prefill ``input_ids`` (B, T) with the fp model and record every layer's attention inputs.

    Raises:
        ValueError: ``queries`` not in [1, T], or no attention modules found.
        RuntimeError: the reconstructed queries do not reproduce the model's attention output (an
            unsupported attention variant).
    """
    num_tokens = input_ids.shape[1]
    if not 1 <= queries <= num_tokens:
        raise ValueError(f"queries must be in [1, {num_tokens}], got {queries!r}")
    modules = _attention_modules(model)
    recorded: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def pre_hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)[:, -queries:]  # (B, M, hidden)
        cos, sin = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        head_dim = module.head_dim
        query = module.q_proj(hidden).view(*hidden.shape[:-1], -1, head_dim)  # (B, M, H_q, D)
        if getattr(module, "q_norm", None) is not None:
            query = module.q_norm(query)
        query = query.transpose(1, 2)  # (B, H_q, M, D)
        cos, sin = cos[:, -queries:].unsqueeze(1), sin[:, -queries:].unsqueeze(1)  # (B, 1, M, D)
        recorded[module.layer_idx] = (query * cos + _rotate_half(query) * sin).float()

    def post_hook(module, args, kwargs, output):
        attn_output = output[0] if isinstance(output, tuple) else output
        outputs[module.layer_idx] = attn_output[:, -queries:].float()  # (B, M, hidden)

    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
        cache, _ = forward_last(model, input_ids)
    finally:
        for handle in handles:
            handle.remove()
    full = full_layers(cache, num_tokens)  # layer index -> (keys, values)
    if not full:
        raise ValueError("the model's cache holds no full-attention layer with plain keys/values")
    modules = [m for m in modules if m.layer_idx in full]
    capture = AttentionCapture(
        queries=[recorded[m.layer_idx] for m in modules],
        keys=[full[m.layer_idx][0] for m in modules],
        values=[full[m.layer_idx][1] for m in modules],
        scales=[float(getattr(m, "scaling", m.head_dim**-0.5)) for m in modules],
        layers=[m.layer_idx for m in modules],
    )
    # Self-check: exact attention of the recorded queries, through o_proj, must give the module's output.
    for module, query, keys, values, scale in zip(
        modules, capture.queries, capture.keys, capture.values, capture.scales
    ):
        attn = _exact_attention(query, keys, values, scale)  # (B, H_q, M, D)
        batch, heads, m, dim = attn.shape
        rebuilt = module.o_proj(attn.transpose(1, 2).reshape(batch, m, heads * dim).to(module.o_proj.weight.dtype))
        expected = outputs[module.layer_idx]
        err = ((rebuilt.float() - expected).norm() / expected.norm().clamp_min(1e-12)).item()
        if err > 1e-3:
            raise RuntimeError(
                f"layer {module.layer_idx}: queries rebuilt by the hooks do not reproduce the model's attention "
                f"(relative error {err:.2e}); {type(module).__name__} is not supported by attention_distortion"
            )
    return capture


@torch.no_grad()
def _layer_error(config: MethodConfig, layer_idx: int, query, keys, values, scale: float) -> float:
    """Mean relative L2 error of the attention rows of the last M positions, decoded one at a time."""
    layer = make_layer(config, layer_idx=layer_idx)
    m, t = query.shape[2], keys.shape[2]
    rep = query.shape[1] // keys.shape[1]
    full_keys = keys.float().repeat_interleave(rep, dim=1)  # (B, H_q, T, D)
    exact_all = query @ full_keys.transpose(-1, -2) * scale  # (B, H_q, M, T)
    layer.append(keys[:, :, : t - m], values[:, :, : t - m])
    errors = []
    for j in range(m):
        pos = t - m + j
        layer.append(keys[:, :, pos : pos + 1], values[:, :, pos : pos + 1])
        estimate = torch.softmax(layer.scores(query[:, :, j : j + 1]) * scale, dim=-1)  # (B, H_q, 1, pos + 1)
        exact = torch.softmax(exact_all[:, :, j : j + 1, : pos + 1], dim=-1)
        errors.append((estimate - exact).norm(dim=-1) / exact.norm(dim=-1))  # (B, H_q, 1)
    return torch.cat(errors, dim=-1).mean().item()


def attention_distortion(
    capture: AttentionCapture,
    methods: Mapping[str, MethodConfig | Callable[[int], MethodConfig | None]],
    *,
    progress: bool = False,
) -> dict[str, DistortionResult]:
    """Per-layer attention-weight error of each method on ``capture`` (from :func:`capture_attention`).

    Args:
        capture: real queries, keys and values.
        methods: label -> method config, or ``layer index -> config`` (per-layer settings; None: a layer kept
            in full precision, error 0). fp has no entry: its error is 0 by construction.
        progress: show a tqdm bar on stderr.

    Returns:
        label -> :class:`DistortionResult`.
    """
    results = {}
    layers = capture.layers or list(range(len(capture.keys)))
    with progress_bar(len(methods) * len(layers), "distortion", progress) as bar:
        for label, config in methods.items():
            start = time.perf_counter()
            per_layer = []
            for k, i in enumerate(layers):
                layer_config = config(i) if callable(config) else config
                per_layer.append(0.0 if layer_config is None else _layer_error(
                    layer_config, i, capture.queries[k], capture.keys[k], capture.values[k], capture.scales[k]))  # fmt: skip
                bar.update()
            results[label] = DistortionResult(
                label=label,
                context=capture.num_tokens,
                queries=capture.num_queries,
                per_layer=per_layer,
                seconds=time.perf_counter() - start,
                layers=list(layers),
            )
    return results
