"""Saving and loading compressed layers: one safetensors file, codes as they are stored (no re-quantization).

A slot may also hold a pair of full-precision ``(keys, values)`` tensors (a layer kept unquantized) or
``None``; ``extra`` is JSON-able metadata saved alongside (the transformers cache's own description).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .registry import config_class, make_layer

__all__ = ["load_layers", "read_extra", "save_layers"]

_FORMAT = "kvpack-layers-v1"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("saving caches needs safetensors: pip install safetensors") from None
    return safetensors.torch


def save_layers(path: str | os.PathLike, layers: list, extra: dict | None = None) -> None:
    """Write ``layers`` to ``path`` atomically: kvpack layers, ``(keys, values)`` fp tensor pairs, or ``None``.

    Raises:
        ValueError: a layer holds no tokens.
    """
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for i, layer in enumerate(layers):
        if layer is None:
            entries.append(None)
        elif isinstance(layer, tuple):
            keys, values = layer
            tensors[f"{i}.fp.keys"], tensors[f"{i}.fp.values"] = keys.detach().cpu(), values.detach().cpu()
            entries.append({"fp": True})
        else:
            layer_tensors, metadata = layer.state_dict()
            tensors.update({f"{i}.{name}": t.cpu() for name, t in layer_tensors.items()})
            entries.append(metadata)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    header = {"format": _FORMAT, "layers": json.dumps(entries), "extra": json.dumps(extra or {})}
    _safetensors().save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata=header)
    os.replace(tmp, path)


def read_extra(path: str | os.PathLike) -> dict:
    """The ``extra`` metadata of a file written by :func:`save_layers` (``{}`` if none was given).

    Raises:
        ValueError: the file is not a kvpack layer file.
    """
    return json.loads(_header(path).get("extra") or "{}")


def _header(path) -> dict:
    from safetensors import safe_open

    _safetensors()
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a kvpack layer file (format {metadata.get('format')!r}, expected {_FORMAT!r})")
    return metadata


def load_layers(path: str | os.PathLike, device: str | torch.device = "cpu") -> list:
    """Read layers written by :func:`save_layers`; ``None`` slots come back as ``None``, fp slots as
    ``(keys, values)``.

    Raises:
        ValueError: the file is not a kvpack layer file.
    """
    metadata = _header(path)
    tensors = _safetensors().load_file(str(path), device=str(device))
    layers = []
    for i, entry in enumerate(json.loads(metadata["layers"])):
        if entry is None:
            layers.append(None)
            continue
        if entry.get("fp"):
            layers.append((tensors[f"{i}.fp.keys"], tensors[f"{i}.fp.values"]))
            continue
        config = config_class(entry["config"]["method"]).from_dict(entry["config"])
        layer = make_layer(config, layer_idx=entry["layer_idx"])
        prefix = f"{i}."
        layer.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, entry)
        layers.append(layer)
    return layers
