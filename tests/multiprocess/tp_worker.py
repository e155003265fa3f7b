"""One rank of transformers' own tensor parallelism generating through kvpack caches (run by torchrun).

Usage: ``torchrun --nproc-per-node N tp_worker.py SPEC OUT_DIR``. ``SPEC`` is a ``torch.save`` file written by
tests/multiprocess/test_tensor_parallel.py: the saved model's folder, the prompt (``input_ids``,
``attention_mask``), ``max_new_tokens`` and the runs (``(name, method, overrides, fused)``). Each rank loads the
model with ``DistributedConfig(tp_plan="auto")`` (q/k/v projections column-sharded: the rank holds
``num_key_value_heads / N`` kv heads; o_proj row-sharded and all-reduced), runs greedy generation for every run
and writes ``OUT_DIR/rank{r}.pt`` with :func:`generation_record` per run, plus what it holds of the sharding.

The test runs :func:`run_generation` on the unsharded model in its own process and compares.
"""

from __future__ import annotations

import sys

import torch

from kvpack.hf import KVPackLayer, disable, enable, make_cache
from kvpack.hf.runtime import generate


def run_generation(model, spec: dict, method: str, overrides: dict, fused: bool):
    """Greedy generation of ``spec``'s prompt through a fresh kvpack cache; returns ``(output, cache)``.

    ``fused`` switches ``model`` to kvpack's fused attention (:func:`kvpack.hf.enable`) for the run; the compat
    path (sdpa over dequantized K/V) otherwise.
    """
    (enable if fused else disable)(model)
    cache = make_cache(model, method, **overrides)
    try:
        with torch.no_grad():
            out = generate(
                model,
                cache,
                input_ids=spec["input_ids"],
                attention_mask=spec["attention_mask"],
                max_new_tokens=spec["max_new_tokens"],
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
    finally:
        disable(model)
    return out, cache


def generation_record(out, cache) -> dict:
    """What is compared across processes: the tokens, the last step's logits, and per layer the store's state.

    ``stores`` holds, per kvpack layer, the dequantized keys/values (B, H_kv, T, D) and the raw state tensors
    (codes, scales, fp residual: each with the kv heads along dim 1) with the store's metadata.
    """
    stores = []
    for layer in cache.layers:
        if not isinstance(layer, KVPackLayer):
            continue
        keys, values = layer.store.dequantize()
        tensors, metadata = layer.store.state_dict()
        stores.append({"keys": keys, "values": values, "tensors": tensors, "metadata": metadata})
    return {"sequences": out.sequences, "last_logits": out.logits[-1].float(), "stores": stores}


def prefill(model, spec, cache):
    """Run the prompt through ``cache`` (one forward) and return it."""
    from kvpack.hf.runtime import CACHE_KWARG

    with torch.no_grad():
        model(input_ids=spec["input_ids"], attention_mask=spec["attention_mask"], **{CACHE_KWARG: cache})
    return cache


def continue_from(model, spec, cache) -> torch.Tensor:
    """Greedy tokens after a prefilled ``cache`` (prompt + one more token, as a caller of a saved cache does)."""
    ids = torch.cat([spec["input_ids"], spec["input_ids"][:, -1:]], dim=1)
    mask = torch.cat([spec["attention_mask"], spec["attention_mask"][:, -1:]], dim=1)
    with torch.no_grad():
        return generate(model, cache, input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)


def saved_cache_checks(model, spec, out_dir: str, rank: int, world: int, dist) -> dict:
    """Per rank: its own saved cache continues as the original; another rank's file and a single process's
    file are refused (the messages)."""
    import copy

    from kvpack import CacheFileError
    from kvpack.hf import load_cache, save_cache

    cache = prefill(model, spec, make_cache(model, "kv3", residual_length=32, group_size=32))
    save_cache(cache, f"{out_dir}/cache{rank}.kvpack")
    want = continue_from(model, spec, copy.deepcopy(cache))
    got = continue_from(model, spec, load_cache(model, f"{out_dir}/cache{rank}.kvpack"))
    dist.barrier()  # every rank's file is written
    refused = {}
    for what, path in (("other rank", f"{out_dir}/cache{(rank + 1) % world}.kvpack"), ("single", spec["single_cache"])):
        try:
            load_cache(model, path)
            refused[what] = None
        except CacheFileError as error:
            refused[what] = str(error)
    return {"same": bool(torch.equal(got, want)), "refused": refused}


def main(spec_path: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    torch.set_num_threads(1)
    spec = torch.load(spec_path)
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], distributed_config=DistributedConfig(tp_plan="auto"), dtype=torch.float32
    ).eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    k_proj = model.model.layers[0].self_attn.k_proj.weight
    sharding = {
        "rank": rank,
        "world_size": world,
        "tp_size": model.tp_size,
        "k_proj_is_dtensor": isinstance(k_proj, DTensor),
        "k_proj_local_rows": (k_proj.to_local() if isinstance(k_proj, DTensor) else k_proj).shape[0],
    }
    records = {}
    for name, method, overrides, fused in spec["runs"]:
        out, cache = run_generation(model, spec, method, overrides, fused)
        records[name] = generation_record(out, cache)
    saved = saved_cache_checks(model, spec, out_dir, rank, world, dist)
    torch.save({"sharding": sharding, "records": records, "saved": saved}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
