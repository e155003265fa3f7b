"""``kvpack bench --device cuda``: decode attention and generation on a GPU.

1. ``attention``: one decode step of one layer of a model shape of the user's choice (``--heads``,
   ``--kv-heads``, ``--head-dim``; default a Llama-3-8B layer: 32 / 8 / 128) over ``context`` tokens at each
   batch: torch SDPA (flash backend where it takes the shape) over the uncompressed cache in the model dtype
   (``--dtype``, bf16 by default) and kvpack's fused Triton step for every method setting, plus
   transformers' ``QuantizedCache`` layers where their backends are installed. SDPA gets the GQA query heads
   of a kv head as that head's query rows (one read of K/V, no repeat), as decode kernels do. Each row: the
   time per step (``triton.testing.do_bench``: CUDA events, median), the bytes the step reads (the cache's
   stored bytes), their rate in GB/s and as a share of this GPU's copy bandwidth measured in the same run,
   and the ratio to SDPA. Every kvpack row is checked first against the pure-torch reference over the same
   store (where the reference fits in memory), so a kernel that computes something else fails the run.
2. ``generate``: greedy tokens/s of a randomly initialised model of ``--model-shape`` (speed does not depend
   on the weights; nothing is downloaded) through :func:`kvpack.bench.run_generate`, the CPU bench's part:
   batches ``--gen-batch`` and the largest batch within ``--memory-budget-gb``. Needs transformers.
"""

from __future__ import annotations

import math

__all__ = ["MODEL_SHAPES", "markdown", "measure_bandwidth", "plot", "random_model", "run_attention", "time_ms"]

GRIDS = {
    "quick": {"batch": (1, 16), "context": (4096, 32768)},
    "full": {"batch": (1, 8, 16, 32), "context": (8192, 32768, 131072)},
}
#: Decoder shapes for the random model of the generate part (and the attention part's defaults).
MODEL_SHAPES = {
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
    ),  # fmt: skip
    "llama3-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
    ),  # fmt: skip
}
#: Append the prompt in chunks of this many tokens (bounds the quantizers' float32 temporaries).
_APPEND_CHUNK = 8192
#: Skip the reference check where its float32 unpacking would take more than this many bytes.
_CHECK_BYTES = 24e9


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device) -> float:
    """Median milliseconds of ``fn``: CUDA events through ``triton.testing.do_bench`` on a GPU, else the
    median of a few wall-clock runs (the harness's own tests run it on the CPU)."""
    import time

    import torch

    if torch.device(device).type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50)
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[1]


def measure_bandwidth(device, gigabytes: float = 2.0) -> float:
    """GB/s of a device-to-device copy of ``gigabytes`` (bytes read + written over the time): the memory
    ceiling the attention rows are compared with."""
    import torch

    n = int(gigabytes * 1e9 / 2)
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * n * 2 / (ms * 1e6)


def _stored(config, keys, values):
    """A kvpack layer holding ``keys``/``values`` plus one decode token (the state a step reads)."""
    from kvpack import make_layer

    layer = make_layer(config)
    for start in range(0, keys.shape[2] - 1, _APPEND_CHUNK):
        end = min(start + _APPEND_CHUNK, keys.shape[2] - 1)
        layer.append(keys[:, :, start:end], values[:, :, start:end])
    layer.append(keys[:, :, -1:], values[:, :, -1:])
    return layer


def _check(name, layer, query) -> float | None:
    """Max |fused - reference| / max |reference| of one step, or None where the reference would not fit."""
    import torch

    from kvpack import kernels

    batch, heads, tokens, dim = layer.shape[0], layer.shape[1], layer.num_tokens, layer.shape[2]
    if 4 * 4 * batch * heads * tokens * dim > _CHECK_BYTES:
        return None
    got = layer.attend(query).float()
    with kernels.use("reference"):
        want = layer.attend(query).float()
    error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
    del want
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if not math.isfinite(error) or error > 2e-2:
        raise RuntimeError(f"bench variant {name!r} fails validation: relative error {error:.3g} > 0.02")
    return error


def _sdpa(query, keys, values):
    """Decode attention over the uncompressed cache: the kv head's query heads as its query rows."""
    import torch

    batch, heads_q, _, dim = query.shape
    heads_kv = keys.shape[1]
    rows = query.reshape(batch, heads_kv, heads_q // heads_kv, dim)
    backends = [torch.nn.attention.SDPBackend.FLASH_ATTENTION, torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
                torch.nn.attention.SDPBackend.MATH]  # fmt: skip
    if query.device.type != "cuda":
        backends = [torch.nn.attention.SDPBackend.MATH]

    def run():
        with torch.nn.attention.sdpa_kernel(backends, set_priority=True):
            return torch.nn.functional.scaled_dot_product_attention(rows, keys, values)

    return run


def run_attention(args, device, log=print) -> list[dict]:
    """Part 1 on ``device`` (see the module docstring); returns one row per (context, batch, method)."""
    import torch

    from kvpack.bench import kvpack_configs

    dtype = getattr(torch, args.dtype)
    heads, heads_kv, dim = args.heads, args.kv_heads, args.head_dim
    if heads % heads_kv:
        raise SystemExit(f"--heads ({heads}) must be a multiple of --kv-heads ({heads_kv})")
    grid = GRIDS[args.grid]
    contexts, batches = args.context or grid["context"], args.batch or grid["batch"]
    configs = {name: c for name, c in kvpack_configs().items() if not args.methods or name in args.methods}
    bandwidth = measure_bandwidth(device) if torch.device(device).type == "cuda" else float("nan")
    log(f"\n== GPU decode attention: one layer, {heads} q / {heads_kv} kv heads, head_dim {dim}, {args.dtype}; "
        f"copy bandwidth {bandwidth:.0f} GB/s (measured) ==")  # fmt: skip
    log(f"{'batch':>5} {'context':>7}  {'method':<17} {'ms/step':>8} {'x SDPA':>7} {'GB read':>8} {'GB/s':>7} "
        f"{'% bw':>6}  check")  # fmt: skip
    rows = []
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for context in contexts:
        for batch in batches:
            fp_bytes = 2 * batch * heads_kv * context * dim * dtype.itemsize
            if fp_bytes > args.max_cache_gb * 1e9:
                log(f"{batch:>5} {context:>7}  (skipped: the {fp_bytes / 1e9:.1f} GB cache exceeds --max-cache-gb)")
                continue
            shape = (batch, heads_kv, context, dim)
            keys = torch.randn(shape, generator=gen, device=device, dtype=dtype)
            values = torch.randn(shape, generator=gen, device=device, dtype=dtype)
            query = torch.randn(batch, heads, 1, dim, generator=gen, device=device, dtype=dtype)
            sdpa_ms = time_ms(_sdpa(query, keys, values), device)

            def row(method, ms, nbytes, check=None):
                rows.append(_row(method, batch, context, ms, nbytes, sdpa_ms, bandwidth, check, log))

            row(f"{args.dtype} SDPA", sdpa_ms, fp_bytes)
            for name, config in configs.items():
                layer = _stored(config, keys, values)
                check = _check(name, layer, query)
                row(name, time_ms(lambda layer=layer: layer.attend(query), device), layer.nbytes(), check)
                del layer
            _quantized_cache_rows(keys, values, query, device, row, log, batch, context)
            del keys, values
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _row(method, batch, context, ms, nbytes, sdpa_ms, bandwidth, check, log) -> dict:
    """One attention row (time, bytes read, their rate against the copy bandwidth, the ratio to SDPA), logged."""
    gbs = nbytes / (ms * 1e6)
    out = {"part": "gpu-attention", "method": method, "batch": batch, "context": context, "ms": ms,
           "bytes_read": nbytes, "vs_sdpa": sdpa_ms / ms, "gbs": gbs, "bandwidth_fraction": gbs / bandwidth,
           "check": check}  # fmt: skip
    checked = "-" if check is None else f"{check:.1e}"
    log(f"{batch:>5} {context:>7}  {method:<17} {ms:>8.3f} {sdpa_ms / ms:>7.2f} {nbytes / 1e9:>8.3f} {gbs:>7.0f} "
        f"{100 * gbs / bandwidth:>5.1f}%  {checked}")  # fmt: skip
    return out


def _quantized_cache_rows(keys, values, query, device, row, log, batch, context) -> None:
    """transformers' ``QuantizedCache`` layers (dequantize all, then SDPA) where a backend is installed, as
    ``row(method, ms, bytes)``."""
    for backend in ("quanto", "hqq"):
        try:
            from kvpack.hf import runtime

            layer = runtime.quantized_layer(backend, keys, values, nbits=2)
        except Exception as err:  # noqa: BLE001 - reported as the row's reason, the run goes on
            log(f"{batch:>5} {context:>7}  {backend + '-2':<17} unavailable: {type(err).__name__}: {str(err)[:80]}")
            continue
        row(f"{backend}-2", time_ms(lambda: runtime.quantized_layer_attention(layer, query), device),
            runtime.layer_nbytes(layer))  # fmt: skip


def random_model(shape: str, dtype, device):
    """A randomly initialised Llama-architecture model of ``MODEL_SHAPES[shape]`` on ``device`` (weights
    drawn there: seconds even at 8B parameters)."""
    import torch

    from kvpack.hf import loading

    if shape not in MODEL_SHAPES:
        raise SystemExit(f"--model-shape must be one of {tuple(MODEL_SHAPES)}, got {shape!r}")
    return loading.random_llama(MODEL_SHAPES[shape], getattr(torch, dtype) if isinstance(dtype, str) else dtype,
                                device)  # fmt: skip


def markdown(rows: list[dict], info: dict) -> str:
    """The GPU rows as Markdown tables (attention, then generate), headed by the machine."""
    lines = [f"# kvpack bench --device cuda: {info['gpu']}, torch {info['torch']}, triton {info['triton']}", ""]
    attention = [r for r in rows if r["part"] == "gpu-attention"]
    if attention:
        lines += ["| batch | context | method | ms/step | x SDPA | GB read | GB/s | % copy bandwidth |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in attention:
            lines.append(f"| {r['batch']} | {r['context']} | {r['method']} | {r['ms']:.3f} | {r['vs_sdpa']:.2f} | "
                         f"{r['bytes_read'] / 1e9:.3f} | {r['gbs']:.0f} | {100 * r['bandwidth_fraction']:.1f} |")  # fmt: skip
        lines.append("")
    generate = [r for r in rows if r["part"].startswith("generate")]
    if generate:
        lines += ["| part | context | method | batch | tokens/s | KV GB |", "|---|---:|---|---:|---:|---:|"]
        for r in generate:
            lines.append(f"| {r['part']} | {r['context']} | {r['method']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
                         f"{r['kv_bytes'] / 1e9:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path) -> str | None:
    """Speed-up over SDPA per (batch, context) and method; returns why no plot was written, or None."""
    attention = [r for r in rows if r["part"] == "gpu-attention" and "SDPA" not in r["method"]]
    if not attention:
        return "no attention rows to plot"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    cases = list(dict.fromkeys((r["batch"], r["context"]) for r in attention))
    methods = list(dict.fromkeys(r["method"] for r in attention))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        speed = {(r["batch"], r["context"]): r["vs_sdpa"] for r in attention if r["method"] == method}
        ax.bar([j + i * width for j in range(len(cases))], [speed.get(c, 0) for c in cases], width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], [f"B{b}\n{c // 1024}k" for b, c in cases])
    ax.set_ylabel("speed-up over SDPA (decode step)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
