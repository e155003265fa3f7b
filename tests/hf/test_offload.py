"""kvpack caches on models whose weights accelerate offloads (CPU or disk), and transformers' cache offloading.

Offloaded weights sit on the meta device; accelerate's ``AlignDevicesHook`` loads them before each module's
forward (from the checkpoint or from ``.dat`` memmaps on disk, from a CPU copy for ``cpu_offload``) and frees
them after. A kvpack cache goes through those forwards as the ``cache`` keyword, which transformers tells the
hooks not to move (``_skip_keys_device_placement``); greedy generation must then give the tokens and logits of
the same model without offload. References are runs of the unhooked model in the same test.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import generate_on_path, make_tiny_llama

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from accelerate.hooks import AlignDevicesHook  # noqa: E402

from kvpack.hf import KVPackLayer, make_cache  # noqa: E402
from kvpack.hf.runtime import generate  # noqa: E402

PATHS = [pytest.param(False, id="compat"), pytest.param(True, id="fused")]
#: Methods and a preset (per-layer configs, fp sinks, bfloat16 residual), at G = 16 (the tiny head_dim) and R = 32:
#: of 70 prompt + 16 new tokens, most keys and values are quantized.
METHODS = ["kivi", "qjl", "turbo", "kv3-plus"]
OVERRIDES = dict(group_size=16, residual_length=32)
PROMPT_LENGTH, MAX_NEW_TOKENS = 70, 16


def _disk_device_map(model) -> dict[str, str]:
    """Every top-level module of the tiny Llama on the CPU except decoder layer 1, on disk."""
    device_map = {name: "cpu" for name, _ in model.model.named_children() if name != "layers"}
    device_map = {f"model.{name}": device for name, device in device_map.items()}
    device_map.update({"model.layers.0": "cpu", "model.layers.1": "disk", "lm_head": "cpu"})
    return device_map


def offload_by_device_map(model, tmp_path):
    """``from_pretrained(device_map={... "model.layers.1": "disk"}, offload_folder=...)`` of the saved model."""
    model.save_pretrained(tmp_path / "model")
    return transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "model",
        device_map=_disk_device_map(model),
        offload_folder=tmp_path / "offload",
        dtype=torch.float32,
    ).eval()


def offload_to_disk(model, tmp_path):
    """``accelerate.disk_offload``: every weight written to ``.dat`` memmaps, read back per module forward."""
    hooked = copy.deepcopy(model)
    accelerate.disk_offload(hooked, tmp_path / "offload", execution_device="cpu")
    assert list((tmp_path / "offload").glob("*.dat")), "disk_offload wrote no weight files"
    return hooked


def offload_to_cpu(model, tmp_path):
    """``accelerate.cpu_offload``: weights on meta, copied in from a CPU state dict per module forward."""
    hooked = copy.deepcopy(model)
    accelerate.cpu_offload(hooked, execution_device="cpu")
    return hooked


OFFLOADS = [
    pytest.param(offload_by_device_map, id="device_map-disk"),
    pytest.param(offload_to_disk, id="disk_offload"),
    pytest.param(offload_to_cpu, id="cpu_offload"),
]


def assert_offloaded(model) -> None:
    """The weights of at least one decoder layer are on meta behind an offloading AlignDevicesHook, so the run
    below really loads them through accelerate (else the comparison would be of a model with itself)."""
    offloaded = [name for name, p in model.model.layers.named_parameters() if p.device.type == "meta"]
    assert offloaded, "no decoder weight is offloaded"
    hooks = [getattr(module, "_hf_hook", None) for module in model.modules()]
    assert any(isinstance(hook, AlignDevicesHook) and hook.offload for hook in hooks), "no offloading hook"


def greedy(model, input_ids, method, fused):
    """Greedy generation through a fresh kvpack cache on the compat or fused path; ``(output, cache)``."""
    cache = make_cache(model, method, **OVERRIDES)
    out = generate_on_path(model, cache, fused, input_ids=input_ids, max_new_tokens=MAX_NEW_TOKENS,
                           output_logits=True, return_dict_in_generate=True)  # fmt: skip
    return out, cache


@pytest.mark.parametrize("offload", OFFLOADS)
@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("method", METHODS)
def test_offloaded_model_generates_what_the_plain_model_does(tmp_path, offload, fused, method):
    """Greedy tokens are identical and every step's logits agree with and without weight offload: the hooks
    only move weights (bit for bit), never the kvpack cache, which ends up holding every token, quantized."""
    model = make_tiny_llama()
    input_ids = torch.randint(2, model.config.vocab_size, (2, PROMPT_LENGTH))
    expected, _ = greedy(model, input_ids, method, fused)

    hooked = offload(model, tmp_path)
    assert_offloaded(hooked)
    out, cache = greedy(hooked, input_ids, method, fused)

    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits))
    assert cache.get_seq_length() == PROMPT_LENGTH + MAX_NEW_TOKENS - 1
    stores = [layer.store for layer in cache.layers if isinstance(layer, KVPackLayer)]
    assert len(stores) == model.config.num_hidden_layers
    assert all(store.keys.num_quantized > 0 and store.values.num_quantized > 0 for store in stores)


def test_transformers_never_offloads_a_kvpack_cache():
    """``KVPackLayer.offload`` / ``prefetch`` raise NotImplementedError; transformers calls them only from
    ``Cache.update`` / ``Cache.prefetch`` of a cache built with ``offloading=True`` (``DynamicCache(offloading=True)``,
    ``cache_implementation="offloaded"``). A kvpack cache is built without it, and generate refuses
    ``cache_implementation`` next to a user cache, so neither can be reached through generate."""
    model = make_tiny_llama()
    cache = make_cache(model, "kivi", **OVERRIDES)
    assert cache.offloading is False
    input_ids = torch.randint(2, model.config.vocab_size, (1, 8))
    with pytest.raises(ValueError, match="cache_implementation"):
        generate(model, cache, input_ids=input_ids, max_new_tokens=2, cache_implementation="offloaded")
    assert cache.get_seq_length() == 0
