"""Saving and loading compressed layers: one safetensors file, codes as they are stored (no re-quantization)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .registry import config_class, make_layer

__all__ = ["save_layers", "load_layers"]

_FORMAT = "kvpack-layers-v1"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("saving caches needs safetensors: pip install safetensors") from None
    return safetensors.torch


def save_layers(path: str | os.PathLike, layers: list) -> None:
    """Write ``layers`` (kvpack layers, or ``None`` for a slot without one) to ``path`` atomically.

    Raises:
        ValueError: a layer holds no tokens.
    """
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for i, layer in enumerate(layers):
        if layer is None:
            entries.append(None)
            continue
        layer_tensors, metadata = layer.state_dict()
        tensors.update({f"{i}.{name}": t.cpu() for name, t in layer_tensors.items()})
        entries.append(metadata)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _safetensors().save_file(tensors, str(tmp), metadata={"format": _FORMAT, "layers": json.dumps(entries)})
    os.replace(tmp, path)


def load_layers(path: str | os.PathLike, device: str | torch.device = "cpu") -> list:
    """Read layers written by :func:`save_layers`; ``None`` slots come back as ``None``.

    Raises:
        ValueError: the file is not a kvpack layer file.
    """
    st = _safetensors()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a kvpack layer file (format {metadata.get('format')!r}, expected {_FORMAT!r})")
    tensors = st.load_file(str(path), device=str(device))
    layers = []
    for i, entry in enumerate(json.loads(metadata["layers"])):
        if entry is None:
            layers.append(None)
            continue
        config = config_class(entry["config"]["method"]).from_dict(entry["config"])
        layer = make_layer(config, layer_idx=entry["layer_idx"])
        prefix = f"{i}."
        layer.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, entry)
        layers.append(layer)
    return layers
