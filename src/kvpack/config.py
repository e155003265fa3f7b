"""Base class of every method config: frozen, validated on construction, round-trips through dicts."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

__all__ = [
    "KEY_CENTERING", "MethodConfig", "RESIDUAL_DTYPES", "SCALE_DTYPES", "check_bool", "check_choice", "check_positive_int",
    "check_recipe_fields", "check_residual", "check_sinks",
]  # fmt: skip

#: Storage dtypes for quantization scales and zeros, by name.
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    """Raise ``ValueError`` naming the allowed set unless ``value`` is one of ``allowed``, of the same type.

    Types are strict: ``2.0`` or ``True`` is not the integer ``2`` (``2.0 in (2, 4)`` is true in Python, and a
    float bit width would only fail later, inside a kernel).
    """
    if not any(type(value) is type(option) and value == option for option in allowed):
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be one of (True, False), got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_residual(group_size: Any, residual_length: Any) -> None:
    """Validate the (G, R) pair every method shares: positive integers, R a multiple of G."""
    check_positive_int("group_size", group_size)
    check_positive_int("residual_length", residual_length)
    if residual_length % group_size:
        raise ValueError(
            f"residual_length must be a positive multiple of group_size ({group_size}), got {residual_length}"
        )


#: Most attention-sink tokens a layer keeps in full precision (a handful is what the literature uses).
MAX_SINK_TOKENS = 1024


def check_sinks(value: Any) -> None:
    """``sink_tokens`` is an integer in [0, MAX_SINK_TOKENS]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SINK_TOKENS:
        raise ValueError(f"sink_tokens must be an integer in [0, {MAX_SINK_TOKENS}], got {value!r}")


def check_recipe_fields(config) -> None:
    """Validate the fields every method config shares beyond its paper.

    * ``sink_tokens``: the first S tokens of a layer are kept in full precision and never quantized.
    * ``residual_dtype``: "model" (default) holds the fp residual, window and sinks in the model's dtype;
      "float16" or "bfloat16" holds those of a float32 model in 16 bits (half the bytes of the part that is
      never quantized, which is all of a short chat; 16-bit models are unaffected).
    * ``key_centering``: "off" (default); "on" subtracts from every key of a head the mean key of the layer's
      first append (its tokens after the sinks; at least 16), which softmax does not see
      (q.(k - mu) = q.k - q.mu for every key of a query), so only the quantizer does; "auto" only for the heads
      whose mean dwarfs the keys' spread (huge k_proj biases, as in Qwen2.5).
    """
    check_sinks(config.sink_tokens)
    check_choice("residual_dtype", config.residual_dtype, RESIDUAL_DTYPES)
    check_choice("key_centering", config.key_centering, KEY_CENTERING)


#: What ``residual_dtype`` may be: "model" holds the fp parts (residual, window, sinks) in the model's dtype; a
#: 16-bit name holds those of a float32 model in 16 bits. A 16-bit model's fp parts always stay in its own dtype
#: (converting between fp16 and bf16 loses range or precision and saves nothing).
RESIDUAL_DTYPES = ("model", "float16", "bfloat16")


#: What ``key_centering`` may be: "off"; "on" subtracts a per-(kv head, channel) key mean taken from a layer's first
#: append; "auto" does so only for the heads whose mean is large against the keys' spread (see
#: :data:`AUTO_CENTERING_RATIO`).
KEY_CENTERING = ("off", "on", "auto")
#: "auto" centers a head whose key mean has a norm above this many times the keys' RMS distance to it. The
#: embedded SmolLM2's heads measure 0.6 - 1.8 (over a 1k-token prompt); a Qwen2.5 layer whose k_proj bias
#: dominates (a bias norm of 600 - 900 against ~22) measures in the tens.
AUTO_CENTERING_RATIO = 4.0
#: Fewest tokens (after the sinks) a layer's first append needs for a key mean to be taken; with fewer, the
#: layer is not centered.
MIN_CENTERING_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Common base: subclasses are frozen dataclasses that set ``method`` and validate in ``__post_init__``."""

    method: ClassVar[str] = ""

    def check_head_dim(self, head_dim: int, what: str = "head_dim") -> None:
        """Raise ``ValueError`` unless this method's packed layouts can hold keys/values of ``head_dim``.

        Called at a layer's first append, when a saved layer is loaded, and by ``make_cache`` for the model's
        head_dim. The base rule: ``group_size`` (where the method has one) divides head_dim, and every code
        width packed along the channels fills whole bytes. ``what`` names the head_dim in messages.
        """
        check_positive_int("head_dim", head_dim)
        group_size = getattr(self, "group_size", None)
        if group_size is not None and head_dim % group_size:
            raise ValueError(f"group_size {group_size} must divide {what} {head_dim}")
        for name in self.channel_packed_bits:
            bits = getattr(self, name)
            if head_dim * bits % 8:
                raise ValueError(f"{what} {head_dim} at {name}={bits} does not fill whole bytes (head_dim * bits % 8)")

    def fp_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the fp parts of a layer whose keys/values come in ``dtype`` are held in (``residual_dtype``,
        where the config has one: 16 bits for a float32 model when asked, else ``dtype`` itself)."""
        name = getattr(self, "residual_dtype", "model")
        return dtype if name == "model" or dtype != torch.float32 else SCALE_DTYPES[name]

    #: Names of the bit-width fields whose codes are packed along head_dim (checked by :meth:`check_head_dim`).
    channel_packed_bits: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields plus ``"method"``; :meth:`from_dict` inverts it."""
        out = {"method": self.method}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        """Build a config from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        data = dict(data)
        method = data.pop("method", cls.method)
        if cls.method and method != cls.method:
            raise ValueError(f"{cls.__name__}.from_dict got method {method!r}, expected {cls.method!r}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; allowed: {sorted(names)}")
        for key, value in data.items():
            if isinstance(value, list):
                data[key] = tuple(value)
        return cls(**data)

    def replace(self, **changes: Any) -> MethodConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
