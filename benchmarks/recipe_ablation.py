"""Quality of quantizer variants that kvpack does not ship, measured before building them into every kernel.

Each variant wraps the formats of a real kvpack cache (the compat path: attention over the reconstruction,
so only the quantizer changes) and is scored with llama.cpp's KL-divergence protocol (``kvpack.eval.kld``:
chunks of 2048 tokens in ubatches of 512, KL to the fp logits over each chunk's second half) on the
embedded SmolLM2-135M and Pride and Prejudice, next to the shipped presets in the same run:

* ``value-centered``: a per-(kv head, channel) value mean (from a layer's first flush) subtracted before
  quantizing and added back after (P.V's weights sum to one, so a kernel would add it once per row);
* ``KIVI rotated``: KIVI-2 with a random orthogonal rotation of keys and values before its groups
  (llama.cpp rotates before its per-token blocks), undone after;
* ``turbo K{k}V{v}`` with 3-bit codes (Lloyd-Max for 8 levels), codes held unpacked (quality only: the
  packed 3-bit layout and its kernels do not exist).

Bits per element exclude the fp residual (turbo: (k + v) / 2 + 0.25 for the fp16 per-token scales at
head_dim 64; KIVI-2: 3.0). Run (about 4 minutes on 2 cores)::

    python benchmarks/recipe_ablation.py [--chunks 4] [--out ablation.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

from kvpack.data.austen import austen_text
from kvpack.eval.kld import kl_divergence
from kvpack.hf import make_cache
from kvpack.hf.cache import KVPackLayer
from kvpack.hf.loading import load_model
from kvpack.methods.turbo import gaussian_codebook, random_rotation


def _patch(cache, side: str, quantize, dequantize) -> None:
    """Replace one side's format methods on every kvpack layer: ``quantize(inner, layer, x)`` and
    ``dequantize(inner, layer, rows)``, ``inner`` the original bound methods."""
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, KVPackLayer):
            continue
        fmt = getattr(layer.store, side).format
        inner = (fmt.quantize, fmt.dequantize)
        fmt.quantize = lambda x, inner=inner, i=i: quantize(inner, i, x)
        fmt.dequantize = lambda rows, inner=inner, i=i: dequantize(inner, i, rows)
        fmt.quantize_into = lambda x, rows: False  # every flush through quantize


def value_centered(model, preset="kv3"):
    cache = make_cache(model, preset)
    means: dict[int, torch.Tensor] = {}

    def quantize(inner, i, x):
        mean = means.setdefault(i, x.float().mean(dim=(0, 2), keepdim=True))
        return inner[0]((x.float() - mean).to(x.dtype))

    _patch(cache, "values", quantize, lambda inner, i, rows: inner[1](rows) + means[i])
    return cache


def kivi_rotated(model, sides=("keys", "values")):
    cache = make_cache(model, "kivi")
    for side in sides:
        rotations: dict[int, torch.Tensor] = {}
        seed = 7 if side == "keys" else 8

        def quantize(inner, i, x, rotations=rotations, seed=seed):
            rotation = rotations.setdefault(i, random_rotation(x.shape[-1], seed, i))
            return inner[0]((x.float() @ rotation.T).to(x.dtype))

        _patch(cache, side, quantize, lambda inner, i, rows, rotations=rotations: inner[1](rows) @ rotations[i])
    return cache


def turbo_bits(model, key_bits: int, value_bits: int, sinks: int = 16, nc: str = "off"):
    """turbo with any code width (3 included), codes unpacked: the recipe's sinks and bf16 residual."""
    config = dict(sink_tokens=sinks, residual_dtype="bfloat16", norm_correction=nc)
    # A 3-bit side is built at 4 bits (its rotation is what the wrapper uses) and its rows replaced.
    cache = make_cache(model, "turbo", key_bits=4 if key_bits == 3 else key_bits,
                       value_bits=4 if value_bits == 3 else value_bits, **config)  # fmt: skip
    for side, bits in (("keys", key_bits), ("values", value_bits)):
        if bits != 3:
            continue
        codebook = torch.tensor(gaussian_codebook(3), dtype=torch.float32) / 8.0  # N(0, 1/64) coordinates
        bounds = (codebook[1:] + codebook[:-1]) / 2

        def quantize(inner, i, x, codebook=codebook, bounds=bounds, side=side):
            rotation = getattr(cache.layers[i].store, side).format.codec.rotation
            rotated = x.float() @ rotation.T
            norm = rotated.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            codes = torch.bucketize(rotated / norm, bounds).to(torch.uint8)
            words = codebook[codes.long()]
            if nc in (side, "both"):
                scale = (norm.squeeze(-1) / words.norm(dim=-1)).half()
            else:
                scale = ((rotated * words).sum(-1) / words.pow(2).sum(-1)).half()
            if side == "keys":  # (B, H, N, G, ...) rows of G tokens, as turbo's key format
                b, h, t, d = x.shape
                g = cache.layers[i].store.keys.unit
                return {"codes3": codes.reshape(b, h, t // g, g, d), "scale": scale.reshape(b, h, t // g, g)}
            return {"codes3": codes, "scale": scale}

        def dequantize(inner, i, rows, codebook=codebook, side=side):
            rotation = getattr(cache.layers[i].store, side).format.codec.rotation
            out = (codebook[rows["codes3"].long()] * rows["scale"].float().unsqueeze(-1)) @ rotation
            return out.flatten(2, 3) if side == "keys" else out

        _patch(cache, side, quantize, dequantize)
    return cache


def variants():
    """label -> (bits per element excluding the fp residual, cache factory)."""
    turbo = lambda k, v: (k + v) / 2 + 0.25  # noqa: E731
    return {
        "kv3 (shipped: turbo K4V2 + 16 sinks)": (turbo(4, 2), lambda m: make_cache(m, "kv3")),
        "kv3 + norm correction, both": (turbo(4, 2), lambda m: make_cache(m, "kv3", norm_correction="both")),
        "kv3 + norm correction, keys": (turbo(4, 2), lambda m: make_cache(m, "kv3", norm_correction="keys")),
        "kv3 + norm correction, values": (turbo(4, 2), lambda m: make_cache(m, "kv3", norm_correction="values")),
        "turbo K2V2 + 16 sinks + NC keys": (turbo(2, 2), lambda m: turbo_bits(m, 2, 2, nc="keys")),
        "kv3 + value centering": (turbo(4, 2), value_centered),
        "kv3 + key centering (on)": (turbo(4, 2), lambda m: make_cache(m, "kv3", key_centering="on")),
        "turbo K3V3 + 16 sinks": (turbo(3, 3), lambda m: turbo_bits(m, 3, 3)),
        "turbo K4V3 + 16 sinks": (turbo(4, 3), lambda m: turbo_bits(m, 4, 3)),
        "turbo K3V2 + 16 sinks": (turbo(3, 2), lambda m: turbo_bits(m, 3, 2)),
        "turbo K3V2 + 16 sinks + NC keys": (turbo(3, 2), lambda m: turbo_bits(m, 3, 2, nc="keys")),
        "turbo K4V3 + 16 sinks + NC keys": (turbo(4, 3), lambda m: turbo_bits(m, 4, 3, nc="keys")),
        "turbo K2V2 + 16 sinks": (turbo(2, 2), lambda m: turbo_bits(m, 2, 2)),
        "KIVI-2": (3.0, lambda m: make_cache(m, "kivi")),
        "KIVI-2, keys and values rotated": (3.0, kivi_rotated),
        "KIVI-2, values rotated": (3.0, lambda m: kivi_rotated(m, sides=("values",))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model, tokenizer = load_model()
    text = austen_text("prideprejudice")
    table = variants()
    start = time.time()
    results = kl_divergence(model, tokenizer, text, {label: factory for label, (_, factory) in table.items()},
                            chunks=args.chunks)  # fmt: skip
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"{args.chunks} chunks of 2048 in {time.time() - start:.0f} s")  # fmt: skip
    rows = []
    print(f"{'variant':40s} {'bits':>5s} {'KL':>8s} {'top-1':>6s}")
    for label, (bits, _) in table.items():
        r = results[label]
        rows.append({"variant": label, "bits": bits, "kl": r.kl, "top1": r.top1, "per_chunk_kl": r.per_chunk_kl})
        print(f"{label:40s} {bits:5.2f} {r.kl:8.4f} {100 * r.top1:5.1f}%")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"chunks": args.chunks, "rows": rows}, f, indent=1)
    assert all(math.isfinite(row["kl"]) for row in rows)


if __name__ == "__main__":
    main()
