"""The core on any device: every method's append, flush, attend, crop, batch edits, save and load run on the
tensors' own device (no hidden ``.cpu()``, no CPU-only op), and give what the CPU gives.

On a machine with a CUDA GPU the layers live there (the Triton kernels where they apply, the pure-torch
reference elsewhere) and are compared with the same layers on the CPU; without one the same code runs on the
CPU under the ``"reference"`` backend, the path a GPU without Triton takes.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from kvpack import KIVIConfig, QJLConfig, TurboConfig, kernels, make_layer
from kvpack.io import load_layers, save_layers

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
CONFIGS = [
    KIVIConfig(residual_length=32),
    KIVIConfig(key_bits=4, value_bits=4, group_size=16, residual_length=32),
    QJLConfig(residual_length=32),
    TurboConfig(key_bits=4, residual_length=32),
]
IDS = ("kivi2", "kivi4", "qjl", "turbo-k4v2")


def _policy(device: str):
    return kernels.use("reference") if device == "cpu" else contextlib.nullcontext()


def _tensors_of(layer) -> list[torch.Tensor]:
    tensors, _ = layer.state_dict()
    return list(tensors.values())


def _run(config, device: str, tmp_path):
    """One layer through prefill, decode steps (flushes and window slides), crop, batch edits, save, load;
    returns what it attended at each step and the loaded layer's attention."""
    gen = torch.Generator().manual_seed(0)
    draw = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731 - the same draws everywhere
    outputs = []
    with _policy(device):
        layer = make_layer(config)
        layer.append(draw(2, 2, 45, 64), draw(2, 2, 45, 64))
        for _ in range(40):
            layer.append(draw(2, 2, 1, 64), draw(2, 2, 1, 64))
            outputs.append(layer.attend(draw(2, 4, 1, 64)))
        mask = torch.ones(2, 1, 2, layer.num_tokens, dtype=torch.bool, device=device).tril(layer.num_tokens - 2)
        mask[1, ..., :5] = False
        outputs.append(layer.attend(draw(2, 4, 2, 64), attention_mask=mask))
        outputs.append(layer.attend(draw(2, 4, 20, 64)))  # many queries: the materialized SDPA path
        assert {t.device.type for t in _tensors_of(layer)} == {torch.device(device).type}
        layer.crop(70)
        layer.select_batch(torch.tensor([1], device=device))
        layer.repeat_batch(2)
        outputs.append(layer.attend(draw(2, 4, 1, 64)))
        save_layers(tmp_path / f"{device}.kvpack", [layer])
        (loaded,) = load_layers(tmp_path / f"{device}.kvpack", device=device)
        assert {t.device.type for t in _tensors_of(loaded)} == {torch.device(device).type}
        query = draw(2, 4, 1, 64)
        outputs.append(loaded.attend(query))
        torch.testing.assert_close(loaded.attend(query), layer.attend(query))
    return [x.cpu() for x in outputs], [x.cpu() for x in layer.dequantize()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_every_step_runs_on_the_tensors_device_and_matches_the_cpu(config, device, tmp_path):
    outputs, state = _run(config, device, tmp_path)
    assert all(bool(torch.isfinite(x).all()) for x in outputs)
    if device == "cpu":
        return
    cpu_outputs, cpu_state = _run(config, "cpu", tmp_path)
    for got, want in zip(state, cpu_state):  # the same codes but where rounding on a cell boundary differs
        assert ((got - want).abs() > 1e-3).float().mean() < 0.01
    for got, want in zip(outputs, cpu_outputs):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_importing_kvpack_imports_no_triton_and_starts_no_cuda():
    """The GPU kernels load on first use: a CPU user pays nothing for them (nor a CUDA context)."""
    import subprocess
    import sys

    code = ("import sys, torch, kvpack; kvpack.make_layer(kvpack.KIVIConfig()); "
            "assert 'triton' not in sys.modules, 'triton'; "
            "assert not torch.cuda.is_initialized(), 'cuda'")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)
