"""Named recipes: a method config plus per-layer settings, each with the bits and quality measured for it.

``kvpack.make_cache(model, "<preset>")``, ``kvpack generate --preset <preset>`` and the evaluation's default
matrix use them; ``kvpack info`` lists them. Per-layer settings are given relative to the model's depth (the
first / last layers), so a preset applies to any model; the numbers were measured on the embedded
SmolLM2-135M (docs/RESULTS.md, "Presets").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .config import MethodConfig

__all__ = ["PRESETS", "Preset", "names"]


def _none(num_layers: int) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named recipe.

    Attributes:
        name: what ``make_cache`` and ``--preset`` take.
        summary: one line: what it is for.
        config: the config of every quantized layer without a per-layer one.
        per_layer: ``num_layers -> {layer index: config}`` (per-layer precision).
        skipped: ``num_layers -> layer indices kept in full precision``.
        measured: what docs/RESULTS.md measured: bits per element and KL to fp (or empty).
    """

    name: str
    summary: str
    config: MethodConfig
    per_layer: Callable[[int], dict[int, MethodConfig]] = _none
    skipped: Callable[[int], tuple[int, ...]] = lambda num_layers: ()
    measured: dict = dataclasses.field(default_factory=dict)

    def layer_configs(self, num_layers: int) -> dict[int, MethodConfig]:
        return dict(self.per_layer(num_layers))

    def skip_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(self.skipped(num_layers))


PRESETS: dict[str, Preset] = {}


def names() -> tuple[str, ...]:
    """Every preset's name, in the order of :data:`PRESETS`."""
    return tuple(PRESETS)


def _first_layers(count: int, config: MethodConfig) -> Callable[[int], dict[int, MethodConfig]]:
    """The first ``count`` layers (of however many the model has) in ``config``."""
    return lambda num_layers: {i: config for i in range(min(count, num_layers))}


def _odd_layers(config: MethodConfig) -> Callable[[int], dict[int, MethodConfig]]:
    """Every other layer (odd indices) in ``config``: measured better than the first half (KLD 0.025 vs 0.031)."""
    return lambda num_layers: {i: config for i in range(1, num_layers, 2)}


def _register(preset: Preset) -> None:
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} is defined twice")
    PRESETS[preset.name] = preset


def _define() -> None:
    from .methods.turbo import TurboConfig

    # bfloat16 fp parts for float32 models: half the bytes of what is never quantized (all of a short chat),
    # KL unchanged (measured: 0.0089 with float32, float16 or bfloat16 parts); bfloat16 holds any float32 value.
    # key_centering "on": every head's key mean out before quantizing (softmax ignores it). Neutral on the embedded
    # SmolLM2 (KLD 0.0090 -> 0.0087), -48% on Gemma 3 270M (0.036 -> 0.019: keys with 38-76x outlier channels),
    # and what protects a layer whose k_proj bias dominates (Qwen2.5); "auto" would center only the last kind.
    # norm_correction "values": 2-bit values keep their norms (KL 0.0090 -> 0.0052 in llama.cpp's protocol,
    # 4 chunks); no change at 4 or 8 bits (0.00182 / 0.00181), and it hurts 2-bit keys (docs/RESULTS.md).
    k4v2 = TurboConfig(key_bits=4, value_bits=2, sink_tokens=16, residual_dtype="bfloat16", key_centering="on",
                       norm_correction="values")  # fmt: skip
    _register(Preset(
        "kv3", "rotated codebooks, 4-bit keys / 2-bit values, 16 fp sink tokens (~3.3 bits per element)",
        k4v2,
    ))  # fmt: skip
    _register(Preset(
        "kv3-lite", "kv3 with 2-bit keys in every other layer (odd indices): ~2.75 bits, for the tightest budgets",
        k4v2, _odd_layers(k4v2.replace(key_bits=2)),
    ))  # fmt: skip
    _register(Preset(
        "kv3-plus", "kv3 with 4-bit values in the first two layers, the most sensitive ones measured (~3.35 bits)",
        k4v2, _first_layers(2, k4v2.replace(value_bits=4)),
    ))  # fmt: skip
    _register(Preset(
        "kv4", "rotated codebooks, 4-bit keys and values, 16 fp sink tokens (~4.3 bits)",
        k4v2.replace(value_bits=4),
    ))  # fmt: skip
    _register(Preset(
        "kv8", "8-bit keys and values, the safe row (users compare it with llama.cpp q8_0 / vLLM FP8; ~8.3 bits)",
        k4v2.replace(key_bits=8, value_bits=8),
    ))  # fmt: skip


_define()
