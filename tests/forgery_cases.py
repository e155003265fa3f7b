"""Run in a child process by tests/test_saved_cache_forgery.py: damage and forge one method's saved file in
every way the matrix lists, load each, and print one JSON line per case (a crash ends the process, which
the parent reports as a failure instead of dying with it).

    python forgery_cases.py METHOD WORKDIR            layer files (kvpack.io)
    python forgery_cases.py cache WORKDIR             a saved transformers cache (kvpack.save_cache)

Each line: {"case", "kind", "outcome": "refused" | "loaded" | "error", "message", and for loaded cases
"same" (the next step equals the original's bit for bit), "fast_matches_reference", "deterministic"}.
"kind" says what the parent may accept: "damage" (raw bytes: refused or a no-op), "structure" (must be
refused), "content" (a forged but well-formed state: refused, or loaded and safe), "overflow" (content at
float max: refused, or loaded and safe where the reference's float32 sums do not overflow).
"""

from __future__ import annotations

import copy
import json
import math
import random
import struct
import sys
from pathlib import Path

import torch

import kvpack
from kvpack import kernels
from kvpack.io import _digest, _header_digest, load_layers, save_layers

LAYER_CONFIGS = {
    "kivi": kvpack.KIVIConfig(group_size=8, residual_length=16),
    "kivi4": kvpack.KIVIConfig(key_bits=4, value_bits=8, group_size=8, residual_length=16, scale_dtype="float32"),
    "qjl": kvpack.QJLConfig(group_size=8, residual_length=16, sketch_dim=32, outlier_sketch_dim=16),
    "qjl_plain": kvpack.QJLConfig(
        group_size=8, residual_length=16, sketch_dim=24, outlier_channels=0, outlier_sketch_dim=0
    ),  # fmt: skip
    "turbo": kvpack.TurboConfig(key_bits=4, group_size=8, residual_length=16),
    "turbo_sinks": kvpack.TurboConfig(key_bits=4, group_size=8, residual_length=16, sink_tokens=3),
    "kivi_sliding": kvpack.KIVIConfig(group_size=8, residual_length=16),
    "kivi_centered_rotated": kvpack.KIVIConfig(group_size=8, residual_length=16, key_centering="on", rotate=True),
}
#: Cases whose layer slides: its window (the second append drops the 8 oldest tokens).
SLIDING_WINDOWS = {"kivi_sliding": 20}
#: Metadata fields whose change must be refused (or be a no-op): they fix the tensors' shapes, dtypes and
#: counts, or the file's own structure. Other fields (seed, residual_length, layer_idx, ...) can describe
#: another valid cache that holds the same tensors: such a file may load, and must then be safe.
STRUCTURAL_FIELDS = {"shape", "dtype", "key_groups", "value_quantized", "method", "key_bits", "value_bits",
                     "group_size", "scale_dtype", "sketch_dim", "outlier_channels", "outlier_sketch_dim",
                     "<removed>", "<added>", "<shortened>", "<lengthened>"}  # fmt: skip

SHAPE = (2, 3, 43, 16)  # batch, kv heads, tokens, head_dim: 2 key flushes of R, a partial residual, a full window


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


# --- the file format, by hand ------------------------------------------------------------------------------
def read_raw(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def write_raw(path: Path, header: dict, body: bytes) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def write_forged(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write tensors + metadata as save_layers would, digests recomputed (a forger's file)."""
    import safetensors.torch

    metadata = dict(metadata)
    metadata["tensors"] = json.dumps({name: _digest(t) for name, t in tensors.items()}, sort_keys=True)
    metadata["checksum"] = _header_digest(metadata)
    safetensors.torch.save_file({k: t.contiguous() for k, t in tensors.items()}, str(path), metadata=metadata)


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    import safetensors.torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    return safetensors.torch.load_file(str(path)), metadata


# --- edits ---------------------------------------------------------------------------------------------------
def tensor_edits(tensors: dict[str, torch.Tensor]):
    """(case, kind, new tensors) for every tensor: reshaped, retyped, removed, filled with extremes."""
    for name, t in tensors.items():
        rest = {k: v for k, v in tensors.items() if k != name}
        yield f"remove {name}", "structure", rest
        if t.dim():
            grown = (
                torch.cat([t, t[..., :1]], dim=-1) if t.shape[-1] else torch.zeros(t.shape[:-1] + (1,), dtype=t.dtype)
            )
            yield f"grow last axis of {name}", "structure", {**rest, name: grown}
            if t.shape[-1] > 1:
                yield f"shrink last axis of {name}", "structure", {**rest, name: t[..., :-1]}
            if t.dim() >= 3 and t.shape[2] > 0:
                yield f"drop a token/group of {name}", "structure", {**rest, name: t[:, :, :-1]}
            yield f"add an axis to {name}", "structure", {**rest, name: t.unsqueeze(0)}
            if t.dim() > 1:
                yield f"flatten {name}", "structure", {**rest, name: t.flatten()}
        for dtype in (torch.float32, torch.float16, torch.uint8, torch.int16, torch.int64, torch.bool):
            if dtype != t.dtype:
                yield f"retype {name} to {dtype}", "structure", {**rest, name: t.to(dtype)}
        if t.is_floating_point():
            for value in (float("nan"), float("inf"), -float("inf")):
                yield f"fill {name} with {value}", "structure", {**rest, name: torch.full_like(t, value)}
            big = torch.finfo(t.dtype).max
            yield f"fill {name} with {big:.3g}", "overflow", {**rest, name: torch.full_like(t, big)}
            yield f"fill {name} with -1", "content", {**rest, name: torch.full_like(t, -1.0)}
            yield f"fill {name} with 0", "content", {**rest, name: torch.zeros_like(t)}
        else:
            info = torch.iinfo(t.dtype) if t.dtype != torch.bool else None
            for value in (info.max, info.min, 0) if info else (True,):
                kind = "content"
                yield f"fill {name} with {value}", kind, {**rest, name: torch.full_like(t, value)}
        if t.numel():
            flipped = t.clone().reshape(-1).view(torch.uint8)
            flipped[len(flipped) // 2] ^= 0x10
            yield (
                f"flip a bit of {name} (digest recomputed)",
                "content",
                {**rest, name: flipped.view(t.dtype).reshape(t.shape)},
            )
    yield "add a stray tensor", "structure", {**tensors, "0.keys.groups.extra": torch.zeros(3)}
    yield "add a tensor of a missing layer", "structure", {**tensors, "9.fp.keys": torch.zeros(1, 1, 1, 16)}


def changed_values(value):
    """Other JSON values for one metadata leaf."""
    if isinstance(value, bool):
        return [not value, 1, None]
    if isinstance(value, int):
        return [value + 1, value - 1, 0, -1, 10**6, 2**63, float(value), str(value), None, True]
    if isinstance(value, float):
        return [value * 2, -value, int(value), "x", None]
    if isinstance(value, str):
        return ["", "x", value + "x", "float64", "kivi", 0, None]
    if value is None:
        return [0, "x", [], {}]
    return []


def leaf_edits(obj, path=()):
    """(path, new object) for every leaf of a JSON object changed, every dict key removed, every list shortened."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield path + (key, "<removed>"), {k: v for k, v in obj.items() if k != key}
            for sub_path, new in leaf_edits(value, path + (key,)):
                yield sub_path, {**obj, key: new}
        yield path + ("<added>",), {**obj, "unexpected": 1}
    elif isinstance(obj, list):
        if obj:
            yield path + ("<shortened>",), obj[:-1]
        yield path + ("<lengthened>",), obj + [obj[-1] if obj else 0]
        for i, value in enumerate(obj):
            for sub_path, new in leaf_edits(value, path + (i,)):
                yield sub_path, obj[:i] + [new] + obj[i + 1 :]
    else:
        for new in changed_values(obj):
            yield path + (repr(new),), new


def metadata_kind(path: tuple) -> str:
    """ "structure" for edits of :data:`STRUCTURAL_FIELDS` and of whole entries, else "content"."""
    if len(path) <= 2 or any(field in path for field in STRUCTURAL_FIELDS):
        return "structure"
    return "content"


# --- layer files -------------------------------------------------------------------------------------------
def make_layers(method: str):
    config = LAYER_CONFIGS[method]
    gen = torch.Generator().manual_seed(0)
    batch, heads, tokens, dim = SHAPE
    keys, values = (
        torch.randn(batch, heads, tokens + 1, dim, generator=gen),
        torch.randn(batch, heads, tokens + 1, dim, generator=gen),
    )
    layer = kvpack.make_layer(config, layer_idx=1, sliding_window=SLIDING_WINDOWS.get(method))
    layer.append(keys[:, :, :30], values[:, :, :30])
    layer.append(keys[:, :, 30:tokens], values[:, :, 30:tokens])
    fp = (torch.randn(batch, heads, tokens, dim, generator=gen), torch.randn(batch, heads, tokens, dim, generator=gen))
    step = (keys[:, :, tokens:], values[:, :, tokens:], torch.randn(batch, 2 * heads, 1, dim, generator=gen))
    return [None, layer, fp], step


def next_step(layer, step, backend: str) -> torch.Tensor:
    keys, values, query = step
    layer = copy.deepcopy(layer)
    with kernels.use(backend):
        layer.append(keys, values)
        return layer.attend(query)


def try_load(path: Path, step, original_out, overflow: bool = False):
    try:
        loaded = load_layers(path)
    except kvpack.CacheFileError as err:
        return {"outcome": "refused", "message": str(err)[:300]}
    except Exception as err:  # noqa: BLE001 - any other error type is what the test reports
        return {"outcome": "error", "message": f"{type(err).__name__}: {err}"[:300]}
    layer = loaded[1] if len(loaded) > 1 else None
    if layer is None or isinstance(layer, tuple):
        return {"outcome": "error", "message": f"layer 1 came back as {type(layer).__name__}"}
    try:
        fast, again = next_step(layer, step, "auto"), next_step(layer, step, "auto")
        ref = next_step(layer, step, "reference")
        score_max = reference_scores(layer, step).abs().max().item() if overflow else 0.0
    except ValueError as err:  # the store refusing the next append (e.g. a scale overflow) is a clear error
        return {"outcome": "loaded", "same": False, "deterministic": True, "fast_matches_reference": True,
                "message": f"next step refused: {err}"[:300]}  # fmt: skip
    except Exception as err:  # noqa: BLE001
        return {"outcome": "error", "message": f"after loading: {type(err).__name__}: {err}"[:300]}
    return {
        "outcome": "loaded",
        "same": bool(torch.equal(fast, original_out)),
        "deterministic": bool(torch.equal(fast.nan_to_num(), again.nan_to_num())),
        "fast_matches_reference": matches(fast, ref, overflow, score_max),
    }


def reference_scores(layer, step) -> torch.Tensor:
    """The reference's q.k of the next step (after its append)."""
    keys, values, query = step
    layer = copy.deepcopy(layer)
    with kernels.use("reference"):
        layer.append(keys, values)
        return layer.scores(query)


def matches(fast: torch.Tensor, ref: torch.Tensor, overflow: bool = False, score_max: float = 0.0) -> bool:
    """Close in the reference's own scale; non-finite exactly where the reference's is. With ``overflow`` (a
    forged state at float max, whose q.k overflows float32), where a sum overflows depends on its order, so
    finiteness may differ between the fused kernel and the reference; the finite entries both have must agree
    to what float32 scores of magnitude ``score_max`` allow: each score is good to ~eps * score_max, which
    moves a softmax weight by a factor of up to exp(2 eps score_max) (two summation orders)."""
    finite = torch.isfinite(ref)
    if overflow:
        finite &= torch.isfinite(fast)
    elif not torch.equal(finite, torch.isfinite(fast)):
        return False
    scale = ref[finite].abs().max().item() if finite.any() else 0.0
    conditioning = math.expm1(min(4 * torch.finfo(torch.float32).eps * score_max, 50.0)) if overflow else 0.0
    atol = max(1e-4, conditioning) * max(scale, 1.0)
    return bool(torch.allclose(fast[finite], ref[finite], rtol=1e-3, atol=atol))


def run_layer_cases(method: str, workdir: Path) -> None:
    layers, step = make_layers(method)
    original = workdir / "original.kvpack"
    save_layers(original, layers)
    original_out = next_step(layers[1], step, "auto")
    baseline = try_load(original, step, original_out)
    emit(case="original", kind="original", **baseline)
    forged = workdir / "forged.kvpack"
    raw = original.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]

    # 1. Damage: truncation and random byte flips, digests left as they are.
    for cut in sorted({0, 4, 8, 9, header_len // 2, 8 + header_len, 8 + header_len + 1, len(raw) // 2, len(raw) - 1}):
        forged.write_bytes(raw[:cut])
        emit(case=f"truncate at {cut}", kind="damage", **try_load(forged, step, original_out))
    rng = random.Random(method)
    for i in range(60):
        pos = rng.randrange(8 + header_len, len(raw)) if i < 40 else rng.randrange(8, 8 + header_len)
        data = bytearray(raw)
        data[pos] ^= 1 << rng.randrange(8)
        forged.write_bytes(bytes(data))
        where = "data" if pos >= 8 + header_len else "header"
        emit(case=f"flip a bit at {pos} ({where})", kind="damage", **try_load(forged, step, original_out))
    forged.write_bytes(rng.randbytes(len(raw)))
    emit(case="random bytes", kind="damage", **try_load(forged, step, original_out))
    import pickle

    forged.write_bytes(pickle.dumps({"layers": [1, 2, 3]}))
    emit(case="a pickle", kind="damage", **try_load(forged, step, original_out))
    tensors, metadata = read_file(original)
    edited = {name: t.clone() for name, t in tensors.items()}
    edited["1.keys.residual"][0, 0, 0, 0] += 1
    import safetensors.torch

    safetensors.torch.save_file(edited, str(forged), metadata=metadata)  # data changed, digests kept
    emit(case="tensor edited, digests kept", kind="damage", **try_load(forged, step, original_out))

    # 2. Forgeries: digests recomputed, so only validation stands between the file and the kernels.
    for case, kind, new_tensors in tensor_edits(tensors):
        write_forged(forged, new_tensors, metadata)
        emit(case=case, kind=kind, **try_load(forged, step, original_out, overflow=kind == "overflow"))
    entries = json.loads(metadata["layers"])
    for path, new_entries in leaf_edits(entries):
        write_forged(forged, tensors, {**metadata, "layers": json.dumps(new_entries)})
        emit(case=f"layers{list(path)}", kind=metadata_kind(path), **try_load(forged, step, original_out))
    for value in ("kvpack-layers-v1", "kvpack-layers-v3", ""):
        write_forged(forged, tensors, {**metadata, "format": value})
        kind = "content" if value.endswith("v1") else "structure"  # v1 files load (validated, no digests)
        emit(case=f"format {value!r}", kind=kind, **try_load(forged, step, original_out))
    header, body = read_raw(original)
    header["__metadata__"]["checksum"] = "0" * 32
    write_raw(forged, header, body)
    emit(case="header checksum replaced", kind="damage", **try_load(forged, step, original_out))
    # A header shape with a huge head_dim must be refused before anything of that size is built.
    big = copy.deepcopy(entries)
    big[1]["shape"][2] = 4096
    write_forged(forged, tensors, {**metadata, "layers": json.dumps(big)})
    emit(case="head_dim 4096 in the header", kind="structure", **try_load(forged, step, original_out))


# --- a saved transformers cache ------------------------------------------------------------------------------
def run_cache_cases(workdir: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from kvpack.hf import runtime

    from conftest import make_tiny_llama

    model = make_tiny_llama()
    kvpack.enable(model)
    prompt = torch.randint(2, 128, (2, 37), generator=torch.Generator().manual_seed(0))
    cache = kvpack.make_cache(model, kvpack.KIVIConfig(group_size=8, residual_length=16), skip_layers=(0,))
    with torch.no_grad():
        cache, _ = runtime.forward(model, prompt, cache, logits_to_keep=1)
    original = workdir / "cache.kvpack"
    kvpack.save_cache(cache, original)
    next_ids = torch.tensor([[5], [7]])

    def step(loaded):
        with torch.no_grad():
            return runtime.forward(model, next_ids, loaded, logits_to_keep=1)[1]

    want = step(copy.deepcopy(cache))

    def try_cache(path, target=model):
        try:
            loaded = kvpack.load_cache(target, path)
        except kvpack.CacheFileError as err:
            return {"outcome": "refused", "message": str(err)[:300]}
        except Exception as err:  # noqa: BLE001
            return {"outcome": "error", "message": f"{type(err).__name__}: {err}"[:300]}
        try:
            got, again = step(copy.deepcopy(loaded)), step(copy.deepcopy(loaded))
            with kernels.use("reference"):
                ref = step(copy.deepcopy(loaded))
        except Exception as err:  # noqa: BLE001
            return {"outcome": "error", "message": f"after loading: {type(err).__name__}: {err}"[:300]}
        return {"outcome": "loaded", "same": bool(torch.equal(got, want)), "deterministic": bool(torch.equal(got, again)),
                "fast_matches_reference": matches(got, ref)}  # fmt: skip

    emit(case="original", kind="original", **try_cache(original))
    tensors, metadata = read_file(original)
    forged = workdir / "forged.kvpack"
    extra = json.loads(metadata["extra"])
    for path, new_extra in leaf_edits(extra):
        write_forged(forged, tensors, {**metadata, "extra": json.dumps(new_extra)})
        emit(case=f"extra{list(path)}", kind="structure", **try_cache(forged))
    entries = json.loads(metadata["layers"])
    # Consistent forgeries across the header: one layer's config changed along with the cache's.
    for field, value in (("key_bits", 4), ("residual_length", 32)):
        new_entries = copy.deepcopy(entries)
        new_entries[1]["config"][field] = value
        emit_case = f"layer 1 config {field}={value}"
        write_forged(forged, tensors, {**metadata, "layers": json.dumps(new_entries)})
        emit(case=emit_case, kind="structure", **try_cache(forged))
    swapped = copy.deepcopy(entries)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    write_forged(forged, tensors, {**metadata, "layers": json.dumps(swapped)})
    emit(case="layer entries swapped", kind="structure", **try_cache(forged))
    # The file is fine, the model is not the one it was saved for.
    emit(case="a bfloat16 model", kind="structure", **try_cache(original, make_tiny_llama().to(torch.bfloat16)))
    emit(case="a model with 3 layers", kind="structure", **try_cache(original, make_tiny_llama(num_hidden_layers=3)))
    emit(case="a model with 1 kv head", kind="structure", **try_cache(original, make_tiny_llama(num_key_value_heads=1)))
    emit(case="a model with head_dim 32", kind="structure", **try_cache(original, make_tiny_llama(head_dim=32)))


if __name__ == "__main__":
    target, folder = sys.argv[1], Path(sys.argv[2])
    if target == "cache":
        run_cache_cases(folder)
    else:
        run_layer_cases(target, folder)
