"""``kvpack demo``: every method on synthetic keys/values; error and bytes held vs an fp16 cache."""

from __future__ import annotations

HELP = "run each method's layer on synthetic data and print error and bytes held vs an fp16 cache"


def add_arguments(parser) -> None:
    parser.add_argument("--tokens", type=int, default=4096, help="tokens in the cache (default 4096)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--q-heads", type=int, default=9)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)


def demo_configs() -> list[tuple[str, object]]:
    """(label, config) pairs the demo runs: every registered method's named settings (:func:`kvpack.variants`)."""
    import kvpack

    return list(kvpack.variants().items())


def run(args) -> int:
    import torch

    import kvpack

    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.kv_heads, args.tokens, args.head_dim)
    # Keys with a few large-magnitude channels, as in real models (the reason KIVI quantizes them per channel).
    channel_scale = torch.ones(args.head_dim)
    channel_scale[: max(1, args.head_dim // 16)] = 8.0
    keys = torch.randn(shape, generator=generator) * channel_scale
    values = torch.randn(shape, generator=generator)
    query = torch.randn(args.batch, args.q_heads, 1, args.head_dim, generator=generator)
    rep = args.q_heads // args.kv_heads
    reference = torch.nn.functional.scaled_dot_product_attention(
        query, keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
    )
    fp16_bytes = 2 * keys.numel() * 2
    print(
        f"synthetic cache: batch {args.batch}, {args.kv_heads} kv heads, {args.tokens} tokens, head_dim {args.head_dim}"
    )
    print(f"{'method':<10} {'bytes held':>12} {'vs fp16':>8} {'bits/elem':>9} {'attn rel err':>12}")
    print(f"{'fp16':<10} {fp16_bytes:>12,} {1.0:>7.2f}x {16.0:>9.2f} {'-':>12}")
    for label, config in demo_configs():
        layer = kvpack.make_layer(config)
        layer.append(keys[:, :, :-1], values[:, :, :-1])  # the prompt
        layer.append(keys[:, :, -1:], values[:, :, -1:])  # one decode step: attention reads the packed store
        out = layer.attend(query)
        err = ((out - reference).norm() / reference.norm()).item()
        held = layer.nbytes()
        bits = 8 * held / (2 * keys.numel())
        print(f"{label:<10} {held:>12,} {fp16_bytes / held:>7.2f}x {bits:>9.2f} {err:>12.4f}")
    return 0
