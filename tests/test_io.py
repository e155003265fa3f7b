import pytest
import torch

import kvpack
from kvpack.io import load_layers, save_layers

CONFIGS = [
    kvpack.KIVIConfig(),
    kvpack.KIVIConfig(key_bits=4, value_bits=8, scale_dtype="float32"),
    kvpack.TurboConfig(),
    kvpack.QJLConfig(),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.method)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bit_exact_and_resumable(tmp_path, config, dtype):
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 300, 64, generator=generator).to(dtype)
    values = torch.randn(2, 3, 300, 64, generator=generator).to(dtype)
    layer = kvpack.make_layer(config, layer_idx=3)
    layer.append(keys[:, :, :290], values[:, :, :290])
    layer.append(keys[:, :, 290:291], values[:, :, 290:291])
    path = tmp_path / "cache.safetensors"
    save_layers(path, [layer, None])
    loaded, empty = load_layers(path)
    assert empty is None and loaded.layer_idx == 3 and loaded.config == config
    assert loaded.num_tokens == layer.num_tokens and loaded.nbytes() == layer.nbytes()
    assert all(torch.equal(a, b) for a, b in zip(layer.dequantize(), loaded.dequantize()))
    # both continue identically
    for target in (layer, loaded):
        target.append(keys[:, :, 291:], values[:, :, 291:])
    query = torch.randn(2, 9, 1, 64, generator=generator).to(dtype)
    assert torch.equal(layer.attend(query), loaded.attend(query))


def test_load_rejects_other_files_and_non_empty_layers(tmp_path):
    import safetensors.torch

    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="not a kvpack layer file"):
        load_layers(path)
    layer = kvpack.make_layer(kvpack.KIVIConfig())
    layer.append(torch.randn(1, 1, 4, 64), torch.randn(1, 1, 4, 64))
    tensors, metadata = layer.state_dict()
    with pytest.raises(ValueError, match="needs an empty layer"):
        layer.load_state_dict(tensors, metadata)
    with pytest.raises(ValueError, match="saved with config"):
        kvpack.make_layer(kvpack.KIVIConfig(key_bits=4)).load_state_dict(tensors, metadata)
