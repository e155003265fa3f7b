"""``kvpack generate`` under torchrun: each process loads its shard with transformers' tensor parallelism
(``load_model`` reads torchrun's WORLD_SIZE), rank 0 alone prints, and the text equals a single process's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvpack.hf.loading import default_model_path  # noqa: E402

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A tiny random Llama (4 query / 4 kv heads, head_dim 32) with the embedded model's tokenizer files."""
    source = default_model_path()
    if not (source / "tokenizer.json").exists():
        pytest.skip("needs the embedded model's tokenizer (scripts/setup.sh)")
    root = tmp_path_factory.mktemp("cli-tp")
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                                      max_position_embeddings=1024, initializer_range=0.5)  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root)
    for name in os.listdir(source):
        if name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copy(source / name, root / name)
    return root


def _generate(model_dir, processes: int) -> subprocess.CompletedProcess:
    args = ["-m", "kvpack.cli", "generate", "Tell me about Mr. Darcy.", "--model", str(model_dir), "--preset", "kv3",
            "--max-new-tokens", "12"]  # fmt: skip
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=240)


def test_generate_under_torchrun_prints_once_and_matches_one_process(tiny_chat_model):
    single = _generate(tiny_chat_model, 1)
    assert single.returncode == 0, single.stderr[-3000:]
    tp = _generate(tiny_chat_model, 2)
    assert tp.returncode == 0, tp.stderr[-3000:]
    assert tp.stdout.count("KV cache:") == 1  # rank 0 reports; rank 1 stays quiet
    text = lambda out: out.stdout.split("KV cache:")[0]  # noqa: E731 - the generated text, streamed first
    assert text(tp) == text(single) and text(single).strip()
    # Each rank holds half the kv heads: rank 0's cache reports half the single process's bytes.
    held = lambda out: int(out.stdout.split("KV cache: ")[1].split(" bytes")[0].replace(",", ""))  # noqa: E731
    assert held(tp) * 2 == held(single)
