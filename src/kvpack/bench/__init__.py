"""The benchmark harness behind ``kvpack bench`` (the CLI parses arguments and prints; this measures).

Parts (``--parts``, default all three):

1. ``attention``: one decode step of attention (one new query token over a cache of ``context`` tokens plus
   that token; cache updates excluded) for one layer and for every layer of the embedded model's shape
   (30 layers, 3 kv heads, 9 query heads, head_dim 64): kvpack fused (packed store, fast kernels), kvpack
   compat (dequantize, then SDPA), float32 and bfloat16 SDPA over an uncompressed cache, and transformers'
   ``QuantizedCache`` layers (quanto, HQQ backends: dequantize the whole cache, then SDPA). For all layers,
   SDPA and the fused path get one cache per layer (distinct memory); the materializing paths (compat,
   quanto, HQQ) reuse one layer's store, as their per-step fp32 copy exceeds the CPU caches anyway, to keep
   memory in bounds. Each row gives
   the time per step, the ratio to float32 SDPA, and the fraction of this machine's limit reached: the
   larger of (bytes read / memory bandwidth) and (multiply-adds / peak fp32 rate), both measured in the
   same run (a large tensor sum and a large matmul).
2. ``generate``: greedy decoding tokens/s of the embedded model per prompt length (``--gen-context``, one
   or several: then the plot shows tokens/s against context) over a batch sweep, and per method the largest
   batch whose KV cache fits ``--memory-budget-gb`` with its throughput (at the longest prompt). Each prompt
   is prefilled once (batch 1) and its per-layer K/V are repeated over the batch to fill each cache.
3. ``prefill``: model prefill time with an uncompressed cache and with each quantized cache, and the
   time spent quantizing (the layers' ``append``).

Timings interleave the variants round-robin and keep each one's best of ``--repeat`` (this machine may be
shared; the load average is reported). Writes ``bench.json`` and ``bench.png`` into ``--out``.

Every timed variant is validated first against an oracle computed in the same run (float64 SDPA for the
SDPA rows, the pure-torch reference kernels over the same packed store for kvpack's rows), so a fast path
that computes something else fails the benchmark instead of producing a number.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

__all__ = [
    "GRIDS", "MODEL_SHAPE", "PARTS", "apply_limits", "attention_case", "attention_methods", "generate_methods",
    "kvpack_configs", "measure_limits", "plot", "run_attention", "run_generate", "run_prefill", "run_round_robin",
    "validate",
]  # fmt: skip

GRIDS = {
    "quick": {"batch": (1, 8), "context": (1024, 8192), "layers": (1, 30)},
    "full": {"batch": (1, 8), "context": (1024, 4096, 8192, 16384, 32768), "layers": (1, 30)},
}
MODEL_SHAPE = {"kv_heads": 3, "q_heads": 9, "head_dim": 64, "layers": 30}  # SmolLM2-135M
PARTS = ("attention", "generate", "prefill")


def kvpack_configs() -> dict:
    """``"kvpack <label>"`` -> config for every registered method setting (:func:`kvpack.variants`)."""
    import kvpack

    return {f"kvpack {label}": config for label, config in kvpack.variants().items()}


def attention_methods() -> tuple[str, ...]:
    """The decode-attention rows: fp baselines, every kvpack setting, kvpack compat, QuantizedCache layers."""
    return ("fp32 SDPA", "bf16 SDPA", *kvpack_configs(), "compat KIVI-2", "quanto-2", "hqq-2")


def generate_methods() -> tuple[str, ...]:
    """The generate/prefill rows: the fp cache, every kvpack setting, kvpack compat, quanto."""
    return ("fp32 DynamicCache", *kvpack_configs(), "compat KIVI-2", "quanto-2")


# --- harness ----------------------------------------------------------------------------------------------
def validate(name: str, fn, check, n_layers: int) -> None:
    """Run variant ``fn`` once and compare each layer's output with ``check = (oracle, tolerance)``
    (max |out - oracle| <= tolerance * max(1, max |oracle|)); None skips the comparison.

    Raises:
        RuntimeError: the variant computes something else.
    """
    import torch

    outputs = fn()
    if check is None:
        return
    oracle, tolerance = check
    for out in outputs:
        error = (out.double() - oracle.double()).abs().max().item()
        bound = tolerance * max(1.0, oracle.abs().max().item())
        if not error <= bound or not bool(torch.isfinite(out).all()):
            raise RuntimeError(f"bench variant {name!r} fails validation: max error {error:.3g} > {bound:.3g}")
    if len(outputs) != n_layers:
        raise RuntimeError(f"bench variant {name!r} returned {len(outputs)} outputs for {n_layers} layers")


def measure_limits(seconds: float = 5.0) -> dict:
    """Memory bandwidth (GB/s, a 512 MB float32 sum) and peak fp32 rate (GFLOP/s, a 1536^3 matmul), each the
    best over about ``seconds`` of repeats (a shared machine's best moments approach its limit)."""
    import torch

    def best_rate(fn, work):
        fn()
        best, deadline = 0.0, time.perf_counter() + seconds / 2
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            fn()
            best = max(best, work / (time.perf_counter() - start))
        return best / 1e9

    x = torch.ones(128 * 1024 * 1024)
    bandwidth = best_rate(x.sum, x.numel() * 4)
    del x
    a, b = torch.randn(1536, 1536), torch.randn(1536, 1536)
    return {"bandwidth_gbs": bandwidth, "peak_gflops": best_rate(lambda: a @ b, 2 * 1536**3)}


def apply_limits(rows: list[dict], limits: dict) -> None:
    """Set each attention row's ``limit_fraction``: max(bytes / bandwidth, multiply-adds / peak) / time."""
    for row in rows:
        if "ms" not in row:
            continue
        memory_s = row["bytes_read"] / (limits["bandwidth_gbs"] * 1e9)
        compute_s = 2 * row["macs"] / (limits["peak_gflops"] * 1e9)
        row["limit_fraction"] = max(memory_s, compute_s) / (row["ms"] / 1e3)
        row["bound"] = "memory" if memory_s >= compute_s else "compute"


def run_round_robin(variants: dict, repeat: int, budget_s: float = 20.0) -> dict:
    """Best seconds of each variant, timing them in turns so that load changes hit all alike.

    A variant whose warm-up call takes longer than ``budget_s / repeat`` gets fewer timed rounds (at least
    one), so that slow baselines do not dominate the run time.
    """
    best, rounds = {}, {}
    for name, fn in variants.items():
        start = time.perf_counter()
        fn()  # warm up (first-use builds, allocations)
        warm = time.perf_counter() - start
        best[name] = float("inf")
        rounds[name] = max(1, min(repeat, int(budget_s / max(warm, 1e-9))))
    for i in range(repeat):
        for name, fn in variants.items():
            if i >= rounds[name]:
                continue
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


# --- part 1: decode attention -----------------------------------------------------------------------------
def _synthetic_kv(batch, tokens, seed):
    import torch

    shape = MODEL_SHAPE
    gen = torch.Generator().manual_seed(seed)
    size = (batch, shape["kv_heads"], tokens, shape["head_dim"])
    channel_scale = torch.ones(shape["head_dim"])
    channel_scale[:4] = 8.0  # a few large key channels, as in real models
    keys = torch.randn(size, generator=gen) * channel_scale
    values = torch.randn(size, generator=gen)
    query = torch.randn(batch, shape["q_heads"], 1, shape["head_dim"], generator=gen)
    return keys, values, query


def attention_case(n_layers, batch, context, methods, repeat, seed, limits) -> list[dict]:
    """Rows of one (layers, batch, context) case; ``limit_fraction`` uses ``limits`` (refined at the end).

    Every variant is validated before it is timed (:func:`validate`): a fast path that computes something
    else is an error, not a row.
    """
    import torch
    import torch.nn.functional as F

    import kvpack
    from kvpack import kernels

    keys, values, query = _synthetic_kv(batch, context + 1, seed)
    tokens = context + 1
    shape = MODEL_SHAPE
    fp32_bytes = 2 * keys.numel() * 4  # one layer's K and V in float32
    macs = 2 * batch * shape["q_heads"] * tokens * shape["head_dim"]  # q.k and p.v, one layer
    variants, bytes_read, notes, checks = {}, {}, {}, {}

    if "fp32 SDPA" in methods or "bf16 SDPA" in methods:
        for name, dtype in (("fp32 SDPA", torch.float32), ("bf16 SDPA", torch.bfloat16)):
            if name not in methods:
                continue
            kv = [(keys.to(dtype).clone(), values.to(dtype).clone()) for _ in range(n_layers)]
            q = query.to(dtype)
            variants[name] = lambda kv=kv, q=q: [
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True) for k, v in kv
            ]
            bytes_read[name] = fp32_bytes * (2 if dtype == torch.float32 else 1) // 2
            exact = F.scaled_dot_product_attention(query.double(), keys.double(), values.double(), enable_gqa=True)
            checks[name] = (exact, 2e-2 if dtype == torch.bfloat16 else 1e-4)  # against float64 SDPA

    configs = kvpack_configs()
    for name, config in configs.items():
        compat = "compat " + name.split(" ", 1)[1]
        if name not in methods and compat not in methods:
            continue
        layer = kvpack.make_layer(config)
        layer.append(keys[:, :, :-1], values[:, :, :-1])  # the prompt (flushes whole blocks)
        layer.append(keys[:, :, -1:], values[:, :, -1:])  # the new token: attention reads the packed store
        stored = layer.nbytes()
        with kernels.use("reference"):
            oracle = layer.attend(query)  # the pure-torch reference over the same packed store
        if name in methods:
            layers = [layer] + [copy.deepcopy(layer) for _ in range(n_layers - 1)]  # distinct memory per layer

            def fused(layers=layers):
                with kernels.use("fast"):
                    return [lay.attend(query) for lay in layers]

            variants[name] = fused
            bytes_read[name] = stored
            checks[name] = (oracle, 1e-4)
        if compat in methods:
            layers = [layer] * n_layers  # one store reused: its fp32 copy exceeds the caches anyway

            def materialized(layers=layers):
                out = []
                for lay in layers:
                    k, v = lay.materialize()
                    out.append(F.scaled_dot_product_attention(query, k, v, enable_gqa=True))
                return out

            variants[compat] = materialized
            bytes_read[compat] = stored + 2 * fp32_bytes  # + the dequantized cache, written then read
            checks[compat] = (oracle, 1e-4)

    from kvpack.hf import runtime

    for backend in ("quanto", "hqq"):
        name = f"{backend}-2"
        if name not in methods:
            continue
        try:  # one layer reused n_layers times: its dequantized fp32 copy exceeds the caches anyway
            layers = [runtime.quantized_layer(backend, keys, values)] * n_layers
        except ImportError as err:
            notes[name] = f"skipped: {err}"
            continue
        variants[name] = lambda layers=layers: [runtime.quantized_layer_attention(lay, query) for lay in layers]
        bytes_read[name] = fp32_bytes * 2 // 16 + 2 * fp32_bytes  # 2-bit codes (scales not counted) + fp copy
        checks[name] = None  # another library's quantizer: timed as it is, its accuracy is not ours to check

    for name, fn in variants.items():
        validate(name, fn, checks[name], n_layers)

    times = run_round_robin(variants, repeat)
    rows = []
    fp32 = times.get("fp32 SDPA")
    for name, seconds in times.items():
        rows.append({
            "layers": n_layers, "batch": batch, "context": context, "method": name, "ms": seconds * 1e3,
            "vs_fp32": fp32 / seconds if fp32 else None, "bytes_read": bytes_read[name] * n_layers,
            "macs": macs * n_layers,
        })  # fmt: skip
    apply_limits(rows, limits)
    for name, note in notes.items():
        rows.append({"layers": n_layers, "batch": batch, "context": context, "method": name, "note": note})
    return rows


def run_attention(args, limits, log=print) -> list[dict]:
    grid = GRIDS[args.grid]
    known = attention_methods()
    methods = args.methods or list(known)
    unknown = set(methods) - set(known)
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}; choose from {known}")
    rows = []
    log(f"\n== decode attention: one new token over `context` cached tokens ({MODEL_SHAPE}) ==")
    log(f"{'layers':>6} {'batch':>5} {'context':>7}  {'method':<17} {'ms/step':>9} {'x fp32':>7} {'% limit':>8}  bound")
    for n_layers in args.layers or grid["layers"]:
        for batch in args.batch or grid["batch"]:
            for context in args.context or grid["context"]:
                fp32_gb = n_layers * 2 * batch * MODEL_SHAPE["kv_heads"] * context * MODEL_SHAPE["head_dim"] * 4 / 1e9
                if fp32_gb > args.max_cache_gb:
                    log(f"{n_layers:>6} {batch:>5} {context:>7}  skipped: float32 cache {fp32_gb:.1f} GB > "
                          f"--max-cache-gb {args.max_cache_gb}")  # fmt: skip
                    continue
                for row in attention_case(n_layers, batch, context, methods, args.repeat, args.seed, limits):
                    rows.append(row)
                    if "note" in row:
                        log(f"{n_layers:>6} {batch:>5} {context:>7}  {row['method']:<17} {row['note']}")
                        continue
                    ratio = f"{row['vs_fp32']:.2f}" if row["vs_fp32"] else "-"
                    log(f"{n_layers:>6} {batch:>5} {context:>7}  {row['method']:<17} {row['ms']:>9.2f} "
                          f"{ratio:>7} {100 * row['limit_fraction']:>7.1f}%  {row['bound']}")  # fmt: skip
    return rows


# --- part 2: generation -----------------------------------------------------------------------------------
def _cache_factories(model, names=None):
    """name -> (make_cache() -> cache, fused attention?) for the generation and prefill parts.

    ``names``: the subset to build (default all of :func:`generate_methods` that can run here).
    """
    # the uncompressed row is named for the model's dtype ("fp32 DynamicCache", "bf16 DynamicCache")
    unknown = {name for name in names or () if name not in generate_methods() and not name.endswith(" DynamicCache")}
    if unknown:
        raise SystemExit(f"unknown --gen-methods {sorted(unknown)}; choose from {generate_methods()}")
    factories = _all_cache_factories(model)
    return {name: f for name, f in factories.items() if names is None or name in names}


_SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _all_cache_factories(model):
    import kvpack

    dtype = str(model.dtype).removeprefix("torch.")
    factories = {f"{_SHORT_DTYPES.get(dtype, dtype)} DynamicCache": (None, False)}
    for name, config in kvpack_configs().items():
        factories[name] = (lambda config=config: kvpack.make_cache(model, config), True)
    factories["compat KIVI-2"] = (lambda: kvpack.make_cache(model, kvpack.KIVIConfig()), False)
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return factories
    from kvpack.hf import runtime

    factories["quanto-2"] = (lambda: runtime.quantized_cache(model, "quanto", nbits=2), False)
    return factories


def _prefilled_kv(model, context, seed):
    """Per-layer (keys, values) of a ``context``-token random prompt, batch 1, and the next token."""
    import torch

    from kvpack.hf import runtime

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=gen).to(model.device)
    with torch.inference_mode():
        cache, logits = runtime.forward(model, ids, runtime.dynamic_cache(model), logits_to_keep=1)
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return kv, logits[:, -1].argmax(-1)


_FILL_CHUNK = 8192


def _filled_cache(factory, model, kv, batch):
    """A cache of ``factory`` holding ``kv`` repeated over ``batch`` rows (or a DynamicCache)."""
    from kvpack.hf import runtime

    cache = runtime.dynamic_cache(model) if factory is None else factory()
    for idx, (k, v) in enumerate(kv):
        for start in range(0, k.shape[2], _FILL_CHUNK):  # chunks bound the batch-wide fp copies and temporaries
            keys, values = (x[:, :, start : start + _FILL_CHUNK].expand(batch, -1, -1, -1) for x in (k, v))
            cache.update(keys.contiguous(), values.contiguous(), idx)
    return cache


def _decode(model, cache, token, batch, steps):
    """Greedy decode ``steps`` tokens from a filled cache; seconds taken."""
    import torch

    from kvpack.hf import runtime

    ids = token.expand(batch).reshape(batch, 1)
    synchronize = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(steps):
            cache, logits = runtime.forward(model, ids, cache, logits_to_keep=1)
            ids = logits[:, -1:].argmax(-1)
    synchronize()
    return time.perf_counter() - start


def run_generate(args, model, log=print) -> list[dict]:
    """Greedy decode tokens/s per (prompt length, batch, method). Methods alternate round-robin over
    ``max(1, repeat // 2)`` rounds per (context, batch), each keeping its best round (the ratios between
    methods are what the runs compare). The largest batch within ``--memory-budget-gb`` is timed at the
    longest context only."""
    import torch

    import kvpack
    from kvpack.hf import runtime

    contexts = sorted(set(args.gen_context))
    rounds = max(1, args.repeat // 2)
    factories = _cache_factories(model, args.gen_methods)
    rows = []

    def timed(factory, fused, kv, token, batch) -> tuple[float, int]:
        (kvpack.enable if fused else kvpack.hf.disable)(model)
        cache = _filled_cache(factory, model, kv, batch)
        nbytes = runtime.cache_nbytes(cache)
        _decode(model, cache, token, batch, 1)  # warm up (the cache grows by one token)
        return _decode(model, cache, token, batch, args.gen_tokens), nbytes

    for context in contexts:
        log(f"\n== generate: greedy decode tokens/s, {context}-token prompt, {args.gen_tokens} new tokens, "
            f"best of {rounds} round(s) ==")  # fmt: skip
        kv, token = _prefilled_kv(model, context, args.seed)
        log(f"{'method':<18} {'batch':>5} {'tokens/s':>9} {'KV MB':>9}")
        per_sequence = {}
        for batch in sorted(set(args.gen_batch)):
            best = {}
            for _ in range(rounds):
                for name, (factory, fused) in factories.items():
                    seconds, nbytes = timed(factory, fused, kv, token, batch)
                    best[name] = min(best.get(name, (float("inf"), 0)), (seconds, nbytes))
                    torch.manual_seed(args.seed)
            for name, (seconds, nbytes) in best.items():
                per_sequence[name] = nbytes / batch
                rows.append({"part": "generate", "method": name, "batch": batch, "context": context,
                             "tokens_per_s": batch * args.gen_tokens / seconds, "kv_bytes": nbytes})  # fmt: skip
                log(f"{name:<18} {batch:>5} {rows[-1]['tokens_per_s']:>9.1f} {nbytes / 1e6:>9.1f}")
        if context != contexts[-1]:
            continue
        budget = args.memory_budget_gb * 1e9
        for name, (factory, fused) in factories.items():
            max_batch = int(budget // per_sequence[name]) if per_sequence.get(name) else 0
            if max_batch < 1:
                continue
            seconds, nbytes = timed(factory, fused, kv, token, max_batch)
            rows.append({"part": "generate-budget", "method": name, "batch": max_batch, "context": context,
                         "tokens_per_s": max_batch * args.gen_tokens / seconds, "kv_bytes": nbytes,
                         "budget_bytes": budget})  # fmt: skip
            log(f"{name:<18} {max_batch:>5} {rows[-1]['tokens_per_s']:>9.1f} {nbytes / 1e6:>9.1f}"
                f"  <- largest batch within {args.memory_budget_gb} GB")  # fmt: skip
    kvpack.hf.disable(model)
    return rows


# --- part 3: prefill --------------------------------------------------------------------------------------
def run_prefill(args, model, log=print) -> list[dict]:
    """Batch-1 prefill per cache. Every method runs once untimed on a short prompt (first-call costs: kernel
    loading, allocator warm-up), then the methods alternate round-robin over ``max(2, repeat // 2)`` rounds
    per context, each keeping its best round (the quantize time is that round's)."""
    import torch

    import kvpack
    from kvpack.hf import runtime

    log("\n== prefill: batch 1 forward over the prompt, per cache; quantization = time in the layers' append ==")
    log(f"{'method':<18} {'context':>7} {'prefill ms':>11} {'quantize ms':>12} {'share':>6}")
    factories = _cache_factories(model, args.gen_methods)

    def prefill(name, ids) -> tuple[float, float]:
        factory, fused = factories[name]
        (kvpack.enable if fused else kvpack.hf.disable)(model)
        cache = runtime.dynamic_cache(model) if factory is None else factory()
        quantize_s = [0.0]
        _time_appends(cache, quantize_s)
        start = time.perf_counter()
        with torch.inference_mode():
            runtime.forward(model, ids, cache, logits_to_keep=1)
        return time.perf_counter() - start, quantize_s[0]

    generator = torch.Generator().manual_seed(args.seed)
    warm_up = torch.randint(0, model.config.vocab_size, (1, 64), generator=generator)
    for name in factories:
        prefill(name, warm_up)
    rows = []
    for context in args.prefill_context:
        ids = torch.randint(0, model.config.vocab_size, (1, context), generator=generator)
        best = {name: (float("inf"), 0.0) for name in factories}
        for _ in range(max(2, args.repeat // 2)):
            for name in factories:
                best[name] = min(best[name], prefill(name, ids))
        for name, (total, quantize) in best.items():
            share = quantize / total if factories[name][0] is not None and "kvpack" in name else None
            rows.append({"part": "prefill", "method": name, "context": context, "ms": total * 1e3,
                         "quantize_ms": quantize * 1e3 if share is not None else None,
                         "quantize_share": share})  # fmt: skip
            quant = f"{quantize * 1e3:>12.1f} {100 * share:>5.1f}%" if share is not None else f"{'-':>12} {'-':>6}"
            log(f"{name:<18} {context:>7} {total * 1e3:>11.1f} {quant}")
    kvpack.hf.disable(model)
    return rows


def _time_appends(cache, accumulator) -> None:
    """Accumulate the seconds kvpack layers spend in ``append`` (quantization and packing) into accumulator[0]."""
    for layer in getattr(cache, "layers", []):
        store = getattr(layer, "store", None)
        if store is None or not hasattr(store, "append"):
            continue
        original = store.append

        def timed(keys, values, original=original):
            start = time.perf_counter()
            original(keys, values)
            accumulator[0] += time.perf_counter() - start

        store.append = timed


# --- output -----------------------------------------------------------------------------------------------
def plot(rows: list[dict], path: Path) -> str | None:
    """One panel per attention case (ms per step vs context), one for generation (tokens/s vs batch) and
    one for prefill (ms vs context), for the parts present in ``rows``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        return f"no plot: {err} (pip install matplotlib)"
    attention = [r for r in rows if r.get("part") == "attention" and "ms" in r]
    generate = [r for r in rows if r.get("part") == "generate"]
    budget_rows = [r for r in rows if r.get("part") == "generate-budget"]
    prefill = [r for r in rows if r.get("part") == "prefill"]
    cases = sorted({(r["layers"], r["batch"]) for r in attention})
    contexts = sorted({r["context"] for r in generate})
    # several prompt lengths: tokens/s against context, one panel per batch; one: against batch
    generate_panels = sorted({r["batch"] for r in generate}) if len(contexts) > 1 else [None] * bool(generate)
    panels = len(cases) + len(generate_panels) + bool(prefill)
    if not panels:
        return "no plot: no rows"
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4), squeeze=False)
    axes = list(axes[0])

    def lines(ax, subset, x, y) -> dict:
        colors = {}
        for method in dict.fromkeys(r["method"] for r in subset):
            pts = sorted((r[x], r[y]) for r in subset if r["method"] == method)
            colors[method] = ax.plot(*zip(*pts), marker="o", label=method)[0].get_color()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        return colors

    for n_layers, batch in cases:
        ax = axes.pop(0)
        lines(ax, [r for r in attention if r["layers"] == n_layers and r["batch"] == batch], "context", "ms")
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per decode step",
               title=f"decode attention: {n_layers} layer(s), batch {batch}")  # fmt: skip
    for batch in generate_panels:
        ax = axes.pop(0)
        if batch is not None:
            lines(ax, [r for r in generate if r["batch"] == batch], "context", "tokens_per_s")
            ax.set(xscale="log", xlabel="prompt tokens", ylabel="tokens/s (greedy)", title=f"generate, batch {batch}")
            ax.set_xticks(contexts, [str(c) for c in contexts])
            ax.minorticks_off()
            continue
        colors = lines(ax, generate, "batch", "tokens_per_s")
        for r in budget_rows:
            ax.scatter([r["batch"]], [r["tokens_per_s"]], marker="*", s=120, color=colors.get(r["method"], "k"))
        budget_gb = next((r["budget_bytes"] / 1e9 for r in budget_rows), None)
        note = f"\nstars: largest batch in {budget_gb:g} GB" if budget_gb else ""
        ax.set(xlabel="batch", ylabel="tokens/s (greedy)", title=f"generate, {contexts[0]}-token prompt{note}")
    if prefill:
        ax = axes.pop(0)
        lines(ax, prefill, "context", "ms")
        ax.set(xlabel="prompt tokens", ylabel="prefill ms (batch 1)", title="prefill")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
