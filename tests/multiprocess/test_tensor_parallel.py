"""kvpack caches under transformers' own tensor parallelism (``DistributedConfig(tp_plan="auto")``, gloo on CPU).

A tiny random Llama (4 kv heads) is saved, then loaded by two torchrun ranks (tests/multiprocess/tp_worker.py)
that each hold 2 of its kv heads: the q/k/v projections are column-sharded, so every kvpack store of a rank
quantizes only its own heads, and o_proj's all-reduce joins them. kvpack quantizes per kv head (KIVI's
per-channel key groups, QJL's sketch and turbo's rotation depend only on the layer), so a rank must store
exactly the heads the single process stores for them, and the greedy tokens must be the same. The runs cover
kivi, qjl, turbo and the kv3-plus preset, each on the compat and the fused attention path.

The reference is the same generation in this process, unsharded. One torchrun session (about 10 s on 2 cores)
serves every test of the module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tp_worker  # noqa: E402  (tests/multiprocess/, next to this file)

from kvpack.hf import make_cache, save_cache  # noqa: E402

WORLD_SIZE = 2
#: 4 kv heads of head_dim 32: each rank holds 2 whole heads (one key group of G = 32 channels each).
TP_LLAMA = dict(
    vocab_size=128,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=32,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,  # generation always runs to max_new_tokens
)
#: R = G = 32: of 80 prompt + 20 new tokens, kivi, qjl and turbo quantize 96 keys and 67 values by the last step.
OVERRIDES = dict(residual_length=32, group_size=32)
PROMPT_LENGTH, MAX_NEW_TOKENS = 80, 20
#: The three methods, and a preset: per-layer configs, 16 fp sink tokens, a bfloat16 fp residual.
METHODS = ("kivi", "qjl", "turbo", "kv3-plus")
RUNS = [(f"{method}-{path}", method, OVERRIDES, path == "fused") for method in METHODS for path in ("compat", "fused")]
RUN_NAMES = [name for name, *_ in RUNS]
WORKER_TIMEOUT_S = 180


def _skip_reason() -> str | None:
    """Why transformers' TP cannot run here, or None."""
    if not torch.distributed.is_available():
        return "torch was built without torch.distributed"
    if not torch.distributed.is_gloo_available():
        return "torch.distributed has no gloo backend (transformers' TP uses gloo on CPU)"
    try:
        from transformers.distributed import DistributedConfig  # noqa: F401
    except ImportError as error:
        return f"this transformers has no transformers.distributed.DistributedConfig ({error})"
    return None


pytestmark = [pytest.mark.multiprocess, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


def _spec(model_dir: Path) -> dict:
    """The prompt and runs, shared by the ranks and the reference: batch 2, the second row left padded by 5."""
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(2, TP_LLAMA["vocab_size"], (2, PROMPT_LENGTH), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0
    input_ids[1, :5] = TP_LLAMA["pad_token_id"]
    return {
        "model_dir": str(model_dir),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "max_new_tokens": MAX_NEW_TOKENS,
        "runs": RUNS,
    }


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    """``(reference, ranks)``: run name -> :func:`tp_worker.generation_record` of the unsharded model in this
    process, and per rank the worker's file (``{"sharding": ..., "records": {run name: record}}``)."""
    root = tmp_path_factory.mktemp("tp")
    config = transformers.LlamaConfig(**TP_LLAMA)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "model")
    spec = _spec(root / "model")
    spec["single_cache"] = str(root / "single.kvpack")  # a single process's saved cache, for the ranks to refuse
    save_cache(tp_worker.prefill(model, spec, make_cache(model, "kv3", residual_length=32, group_size=32)),
               spec["single_cache"])  # fmt: skip
    torch.save(spec, root / "spec.pt")

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD_SIZE}",
               str(Path(tp_worker.__file__)), str(root / "spec.pt"), str(root)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun did not finish in {WORKER_TIMEOUT_S} s:\n{(error.stderr or '')[-4000:]}")
    assert result.returncode == 0, f"torchrun failed ({result.returncode}):\n{result.stderr[-6000:]}"
    ranks = [torch.load(root / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    # The reference: the model as saved, loaded unsharded, the same runs.
    loaded = transformers.AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32).eval()
    reference = {}
    for name, method, overrides, fused in RUNS:
        out, cache = tp_worker.run_generation(loaded, spec, method, overrides, fused)
        reference[name] = tp_worker.generation_record(out, cache)
    return reference, ranks


def test_the_ranks_really_ran_sharded(tp_results):
    """Guard against a vacuous comparison: each rank's k_proj is a DTensor of half the rows, its kvpack stores
    hold half the kv heads, and the unsharded reference quantized keys and values (R = 32 < 100 tokens)."""
    reference, ranks = tp_results
    heads, head_dim = TP_LLAMA["num_key_value_heads"], TP_LLAMA["head_dim"]
    for rank, data in enumerate(ranks):
        sharding = data["sharding"]
        assert (sharding["rank"], sharding["world_size"], sharding["tp_size"]) == (rank, WORLD_SIZE, WORLD_SIZE)
        assert sharding["k_proj_is_dtensor"]
        assert sharding["k_proj_local_rows"] == heads // WORLD_SIZE * head_dim
        for name in RUN_NAMES:
            for store in data["records"][name]["stores"]:
                assert store["metadata"]["shape"] == [2, heads // WORLD_SIZE, head_dim]
    for name in RUN_NAMES:
        for store in reference[name]["stores"]:
            assert store["metadata"]["shape"] == [2, heads, head_dim]
            assert store["metadata"]["key_groups"] > 0 and store["metadata"]["value_quantized"] > 0, name


@pytest.mark.parametrize("name", RUN_NAMES)
def test_tp_greedy_tokens_and_logits_match_the_single_process(tp_results, name):
    """Every rank's greedy tokens equal the unsharded run's, and its last-step logits agree within 1e-4:
    TP only reorders the float reductions (o_proj / down_proj partial sums all-reduced, vocab-sharded
    embedding and lm_head), while a rank quantizing wrong heads, or a store mixing the ranks' heads, moves
    logits by far more than that."""
    reference, ranks = tp_results
    expected = reference[name]
    for rank, data in enumerate(ranks):
        got = data["records"][name]
        assert torch.equal(got["sequences"], expected["sequences"]), f"rank {rank}: tokens differ"
        torch.testing.assert_close(got["last_logits"], expected["last_logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", RUN_NAMES)
def test_tp_rank_stores_are_the_single_process_heads(tp_results, name):
    """Rank r's store of each layer is the unsharded store's kv heads [r * H/N, (r + 1) * H/N).

    Layer 0's keys/values come bitwise unchanged through TP (the embedding all-reduce adds exact zeros, each
    rank computes whole k/v columns), so there every state tensor (codes, scales, norms, fp residual) must be
    bitwise the reference's slice. Later layers' inputs carry the all-reduce's rounding: the same counts of
    quantized tokens, and the dequantized state within 1e-2 (a fp16 scale's last bit at 2 bits; a key or value
    quantized on the wrong head, or with another head's statistics, is off by O(1)).
    """
    reference, ranks = tp_results
    per_rank = TP_LLAMA["num_key_value_heads"] // WORLD_SIZE
    for rank, data in enumerate(ranks):
        heads = slice(rank * per_rank, (rank + 1) * per_rank)
        got_stores, expected_stores = data["records"][name]["stores"], reference[name]["stores"]
        assert len(got_stores) == len(expected_stores) == TP_LLAMA["num_hidden_layers"]
        for layer, (got, expected) in enumerate(zip(got_stores, expected_stores)):
            where = f"rank {rank}, layer {layer}"
            for field in ("key_groups", "value_quantized", "config", "layer_idx", "dtype"):
                assert got["metadata"][field] == expected["metadata"][field], f"{where}: {field}"
            assert got["tensors"].keys() == expected["tensors"].keys(), where
            if layer == 0:
                for key, tensor in got["tensors"].items():
                    assert torch.equal(tensor, expected["tensors"][key][:, heads]), f"{where}: {key} differs"
            for part in ("keys", "values"):
                torch.testing.assert_close(got[part], expected[part][:, heads], atol=1e-2, rtol=0, msg=where)


def test_each_rank_saves_and_loads_its_own_cache(tp_results):
    """Prompt caching under TP: a rank's saved cache holds its kv heads and continues generation exactly as the
    original; the other rank's file and a single process's file (all heads) are refused, saying why."""
    _, ranks = tp_results
    for rank, data in enumerate(ranks):
        saved = data["saved"]
        assert saved["same"], f"rank {rank}: the loaded cache continued differently"
        other, single = saved["refused"]["other rank"], saved["refused"]["single"]
        assert other and f"saved by rank {(rank + 1) % WORLD_SIZE} of {WORLD_SIZE}" in other, other
        assert single and "saved by a single process" in single and f"rank {rank} of {WORLD_SIZE}" in single, single
