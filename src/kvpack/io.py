"""Saving and loading compressed layers: one safetensors file, codes as they are stored (no re-quantization).

A slot may also hold a pair of full-precision ``(keys, values)`` tensors (a layer kept unquantized) or
``None``; ``extra`` is JSON-able metadata saved alongside (the transformers cache's own description).

What a file guarantees (format ``kvpack-layers-v2``):

* **integrity**: the header carries a BLAKE2b digest of every tensor's bytes and of the header itself;
  loading recomputes them and refuses a damaged file (:class:`~kvpack.errors.CacheFileError` naming the
  file and the tensor);
* **validation**: every field and tensor is checked against what the method would have stored
  (:meth:`kvpack.CompressedLayer.load_state_dict`) before anything is built or used, so a forged file whose
  digests were recomputed is refused too, unless it is a state the method could really have produced;
* **no code execution**: safetensors holds raw tensor bytes and a JSON header; nothing is unpickled.

It is not encrypted or signed: whoever can write the file can replace it with another valid cache.
Files of the previous format (``kvpack-layers-v1``, no digests) still load, with full validation but no
integrity check (a warning says so).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from pathlib import Path

import torch

from .config import SCALE_DTYPES
from .errors import CacheFileError
from .registry import config_class, make_layer

__all__ = ["CacheFileError", "MAX_HEAD_DIM", "load_layers", "read_extra", "save_layers"]

logger = logging.getLogger(__name__)

_FORMAT = "kvpack-layers-v2"
_FORMAT_V1 = "kvpack-layers-v1"
_HEADER_FIELDS = ("format", "layers", "extra", "tensors")
_FP_DTYPES = tuple(SCALE_DTYPES.values())  # the dtypes an fp (skipped) layer may hold

#: Largest head_dim :func:`load_layers` accepts by default: per-head_dim state (rotations, sketches) costs
#: O(head_dim^3) to build, so a forged header must not choose it freely. ``load_cache`` uses the model's.
MAX_HEAD_DIM = 1024


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("saving caches needs safetensors: pip install safetensors") from None
    return safetensors.torch


def _digest(tensor: torch.Tensor) -> str:
    """BLAKE2b (128-bit) of a CPU tensor's bytes in C order."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(memoryview(data), digest_size=16).hexdigest()


def _header_digest(header: dict) -> str:
    text = "\0".join(header[field] for field in _HEADER_FIELDS)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def save_layers(path: str | os.PathLike, layers: list, extra: dict | None = None) -> None:
    """Write ``layers`` to ``path`` atomically: kvpack layers, ``(keys, values)`` fp tensor pairs, or ``None``.

    The file is written to a uniquely named temporary beside ``path`` and renamed over it, so a reader
    never sees a partial file and two concurrent saves to one path cannot mix; the temporary is removed
    if writing fails.

    Raises:
        ValueError: ``path`` is a directory, or a layer holds no tokens.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; save_layers writes one file (give a file name)")
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
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    header = {
        "format": _FORMAT,
        "layers": json.dumps(entries),
        "extra": json.dumps(extra or {}),
        "tensors": json.dumps({name: _digest(t) for name, t in tensors.items()}, sort_keys=True),
    }
    header["checksum"] = _header_digest(header)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        _safetensors().save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_header(path) -> dict:
    """The file's metadata, its format checked and (v2) its header digest verified."""
    try:
        from safetensors import safe_open
    except ImportError:
        _safetensors()  # raises the ImportError that says what to install
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise CacheFileError(f"{path} is not a readable safetensors file: {err}") from None
    kind = metadata.get("format")
    if kind not in (_FORMAT, _FORMAT_V1):
        raise CacheFileError(f"{path} is not a kvpack layer file (format {kind!r}, expected {_FORMAT!r})")
    if kind == _FORMAT:
        if any(not isinstance(metadata.get(field), str) for field in _HEADER_FIELDS):
            raise CacheFileError(f"{path}: the header lacks one of {_HEADER_FIELDS}")
        if metadata.get("checksum") != _header_digest(metadata):
            raise CacheFileError(f"{path}: the header's checksum does not match (the file is damaged or was edited)")
    return metadata


def _json_field(path, metadata: dict, field: str, kind: type):
    try:
        value = json.loads(metadata.get(field) or ("{}" if kind is dict else "[]"))
    except (ValueError, RecursionError) as err:
        raise CacheFileError(f"{path}: header field {field!r} is not valid JSON ({err})") from None
    if not isinstance(value, kind):
        raise CacheFileError(f"{path}: header field {field!r} must be a JSON {kind.__name__}")
    return value


def read_extra(path: str | os.PathLike) -> dict:
    """The ``extra`` metadata of a file written by :func:`save_layers` (``{}`` if none was given).

    Raises:
        CacheFileError: the file is not a kvpack layer file, or its header is damaged.
    """
    return _json_field(path, _read_header(path), "extra", dict)


def load_layers(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, max_head_dim: int = MAX_HEAD_DIM
) -> list:
    """Read layers written by :func:`save_layers`; ``None`` slots come back as ``None``, fp slots as
    ``(keys, values)``.

    The whole file is verified (digests) and validated (structure, see the module docstring) before a layer
    is returned; the tensors move to ``device`` only then.

    Raises:
        CacheFileError: the file is not a kvpack layer file, is damaged, or holds a state the methods would
            never store (the message names the file, the layer and the tensor or field).
    """
    metadata = _read_header(path)
    entries = _json_field(path, metadata, "layers", list)
    try:
        tensors = _safetensors().load_file(str(path), device="cpu")
    except Exception as err:
        raise CacheFileError(f"{path}: the tensor data cannot be read: {err}") from None
    if metadata["format"] == _FORMAT:
        digests = _json_field(path, metadata, "tensors", dict)
        if set(digests) != set(tensors):
            raise CacheFileError(
                f"{path}: the file holds tensors {sorted(set(tensors) ^ set(digests))} that its header does not "
                "list, or lacks listed ones"
            )
        for name, tensor in tensors.items():
            if _digest(tensor) != digests[name]:
                raise CacheFileError(f"{path}: tensor {name!r} does not match its checksum (the file is damaged)")
    else:
        logger.warning("%s is a kvpack-layers-v1 file: validated, but it has no checksums to verify", path)
    used: set[str] = set()
    layers = []
    for i, entry in enumerate(entries):
        prefix = f"{i}."
        own = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
        used.update(prefix + name for name in own)
        try:
            layers.append(_load_entry(entry, own, device, max_head_dim))
        except CacheFileError as err:
            raise CacheFileError(f"{path}, layer {i}: {err}") from None
    unused = sorted(set(tensors) - used)
    if unused:
        raise CacheFileError(f"{path}: tensors {unused[:5]} belong to no layer entry")
    return layers


def _load_entry(entry, tensors: dict[str, torch.Tensor], device, max_head_dim: int):
    if entry is None:
        if tensors:
            raise CacheFileError(f"an empty slot holds tensors {sorted(tensors)}")
        return None
    if not isinstance(entry, dict):
        raise CacheFileError(f"a layer entry must be null or an object, got {type(entry).__name__}")
    if entry.get("fp") is True and len(entry) == 1:
        return _load_fp(tensors, device)
    config_dict = entry.get("config")
    if not isinstance(config_dict, dict) or not isinstance(config_dict.get("method"), str):
        raise CacheFileError("the entry has no method config")
    layer_idx = entry.get("layer_idx")
    if type(layer_idx) is not int or layer_idx < 0:
        raise CacheFileError(f"layer_idx must be a non-negative integer, got {layer_idx!r}")
    try:
        config = config_class(config_dict["method"]).from_dict(config_dict)
    except (TypeError, ValueError) as err:
        raise CacheFileError(f"invalid method config {config_dict}: {err}") from None
    try:
        layer = make_layer(config, layer_idx=layer_idx, sliding_window=entry.get("sliding_window"),
                           drop_unit=entry.get("drop_unit"))  # fmt: skip
    except ValueError as err:
        raise CacheFileError(str(err)) from None
    layer.load_state_dict({name: t.to(device) for name, t in tensors.items()}, entry, max_head_dim=max_head_dim)
    return layer


def _load_fp(tensors: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    if set(tensors) != {"fp.keys", "fp.values"}:
        raise CacheFileError(f"an fp layer must hold exactly fp.keys and fp.values, got {sorted(tensors)}")
    keys, values = tensors["fp.keys"], tensors["fp.values"]
    if keys.dim() != 4 or keys.shape != values.shape or keys.dtype != values.dtype or keys.dtype not in _FP_DTYPES:
        raise CacheFileError(
            f"fp keys/values must be two (batch, kv_heads, tokens, head_dim) float tensors of one shape and dtype, "
            f"got {keys.dtype} {tuple(keys.shape)} and {values.dtype} {tuple(values.shape)}"
        )
    if not (bool(torch.isfinite(keys).all()) and bool(torch.isfinite(values).all())):
        raise CacheFileError("fp keys/values hold NaN/Inf values")
    return keys.to(device), values.to(device)
