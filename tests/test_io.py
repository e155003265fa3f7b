from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def _filled_layer():
    layer = kvpack.make_layer(kvpack.KIVIConfig(group_size=8, residual_length=16))
    layer.append(torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16))
    return layer


def test_save_refuses_a_directory_and_leaves_no_temporary_when_it_fails(tmp_path, monkeypatch):
    layer = _filled_layer()
    with pytest.raises(ValueError, match="is a directory"):
        save_layers(tmp_path, [layer])
    import safetensors.torch

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # a write that fails half way
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_layers(tmp_path / "c.kvpack", [layer])
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary


def test_concurrent_saves_to_one_path_leave_one_complete_file(tmp_path):
    layers = [_filled_layer() for _ in range(4)]
    target = tmp_path / "c.kvpack"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda layer: save_layers(target, [layer]), layers))
    (loaded,) = load_layers(target)  # one of the four, whole (digests verified)
    assert any(torch.equal(loaded.dequantize()[0], layer.dequantize()[0]) for layer in layers)
    assert [p.name for p in tmp_path.iterdir()] == ["c.kvpack"]


def test_a_damaged_file_names_the_file_and_the_tensor(tmp_path):
    path = tmp_path / "c.kvpack"
    save_layers(path, [_filled_layer()])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(kvpack.CacheFileError, match=r"c\.kvpack: tensor '0\.[a-z.]+' does not match its checksum"):
        load_layers(path)
