"""``kvpack bench``: decode attention, end-to-end generation and prefill, against baselines, on this machine.

This module parses the arguments and prints; :mod:`kvpack.bench` measures (its docstring describes the
three parts, ``--parts``, and how each row is validated and timed). Writes ``bench.json`` and ``bench.png``
into ``--out``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

HELP = "time decode attention, generation and prefill against SDPA and transformers' QuantizedCache"


def add_arguments(parser) -> None:
    from kvpack.bench import GRIDS, PARTS

    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to run (default all)")
    parser.add_argument("--grid", choices=tuple(GRIDS), default="quick", help="attention grid (default quick)")
    parser.add_argument("--batch", type=int, nargs="+", help="attention batches (overrides the grid)")
    parser.add_argument("--context", type=int, nargs="+", help="attention contexts (overrides the grid)")
    parser.add_argument("--layers", type=int, nargs="+", help="layer counts to time together (default 1 30)")
    parser.add_argument("--methods", nargs="+", help="attention rows (default all, see kvpack info)")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds per variant (best kept, default 5)")
    parser.add_argument("--max-cache-gb", type=float, default=4.0,
                        help="skip attention cases whose float32 cache exceeds this (default 4)")  # fmt: skip
    parser.add_argument("--gen-context", type=int, nargs="+", default=[2048],
                        help="prompt lengths for generate (default 2048); several plot tokens/s against context")  # fmt: skip
    parser.add_argument("--gen-batch", type=int, nargs="+", default=[1, 4, 8], help="generate batch sweep")
    parser.add_argument("--gen-tokens", type=int, default=8, help="tokens decoded per generate run (default 8)")
    parser.add_argument("--gen-methods", nargs="+", help="generate/prefill rows (default all)")
    parser.add_argument("--memory-budget-gb", type=float,
                        help="KV cache budget for the largest-batch column (default 0.5; 40 with --device cuda)")  # fmt: skip
    parser.add_argument("--prefill-context", type=int, nargs="+", default=[1024, 2048], help="prefill lengths")
    parser.add_argument("--out", default="bench-out", help="output folder for bench.json and bench.png")
    parser.add_argument("--threads", type=int, help="torch (and kernel) threads (default: torch's default)")
    parser.add_argument("--busy", type=int, default=0,
                        help="keep N other processes spinning while it runs: decode on a busy machine (default 0)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    gpu = parser.add_argument_group("GPU (--device cuda): kvpack's Triton kernels against SDPA; see kvpack.bench.gpu")
    gpu.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    gpu.add_argument("--heads", type=int, default=32, help="query heads of the attention layer (default 32)")
    gpu.add_argument("--kv-heads", type=int, default=8, help="kv heads (default 8: a Llama-3-8B layer)")
    gpu.add_argument("--head-dim", type=int, default=128, help="head_dim (default 128)")
    gpu.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16", help="model dtype (default bf16)")
    gpu.add_argument("--model-shape", default="llama3-8b",
                     help="random model of the generate part (default llama3-8b; see kvpack.bench.gpu)")  # fmt: skip


def run(args) -> int:
    import torch

    torch.manual_seed(args.seed)
    if args.memory_budget_gb is None:
        args.memory_budget_gb = 40.0 if args.device == "cuda" else 0.5
    if args.device == "cuda":
        return _run_gpu(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    from kvpack.bench import apply_limits, measure_limits, plot
    from kvpack.machine import machine_info

    info = machine_info()
    info["load_average_start"] = info.pop("load_average")
    limits = measure_limits()
    print(f"machine: {info['cpu']} ({', '.join(info['isa']) or 'no x86 SIMD flags'}), {info['cores']} cores, torch "
          f"{info['torch']} with {info['torch_threads']} threads, load average {info['load_average_start']}")  # fmt: skip
    print(f"measured: memory bandwidth {limits['bandwidth_gbs']:.1f} GB/s (float32 sum), "
          f"peak {limits['peak_gflops']:.1f} GFLOP/s (float32 matmul); measured again at the end")  # fmt: skip

    from kvpack.kernels import native

    start = time.perf_counter()
    reason = native.available()
    info["kernel_load_s"] = time.perf_counter() - start
    info["kernel_isa"] = native.isa()
    print(f"fast kernels: {'loaded' if reason is None else 'UNAVAILABLE: ' + reason} ({info['kernel_isa']} build, "
          f"{info['kernel_load_s']:.1f} s, cache {native.cache_dir()})")  # fmt: skip

    rows = []
    busy = _spin(args.busy)
    if busy:
        print(f"busy: {len(busy)} spinning process(es) compete for the cores during the run")
    try:
        rows += _run_parts(args, limits)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    info["busy_processes"] = args.busy
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    end = measure_limits()
    limits = {key: max(limits[key], end[key]) for key in limits}  # the best seen: the machine's limit
    info.update(limits)
    attention = [r for r in rows if r.get("part") == "attention"]
    if attention:
        apply_limits(attention, limits)
        print(f"\n== decode attention against this machine's limit: {limits['bandwidth_gbs']:.1f} GB/s, "
              f"{limits['peak_gflops']:.1f} GFLOP/s (best of start and end) ==")  # fmt: skip
        print(
            f"{'layers':>6} {'batch':>5} {'context':>7}  {'method':<17} {'ms/step':>9} {'x fp32':>7} {'% limit':>8}  bound"
        )
        for row in attention:
            if "ms" in row:
                print(f"{row['layers']:>6} {row['batch']:>5} {row['context']:>7}  {row['method']:<17} {row['ms']:>9.2f} "
                      f"{row['vs_fp32'] or 0:>7.2f} {100 * row['limit_fraction']:>7.1f}%  {row['bound']}")  # fmt: skip
    (out_dir / "bench.json").write_text(json.dumps({"machine": info, "args": vars(args) | {"_run": None}, "rows": rows},
                                                   indent=1, default=str))  # fmt: skip
    note = plot(rows, out_dir / "bench.png")
    print(f"\nwrote {out_dir / 'bench.json'}" + (f"; {note}" if note else f" and {out_dir / 'bench.png'}"))
    print(f"load average at the end: {info['load_average_end']}")
    return 0


def _run_parts(args, limits) -> list[dict]:
    import torch

    from kvpack.bench import run_attention, run_generate, run_prefill

    rows = []
    if "attention" in args.parts:
        rows += [dict(r, part="attention") for r in run_attention(args, limits)]
    if {"generate", "prefill"} & set(args.parts):
        import kvpack

        model, _ = kvpack.load_model()
        torch.set_grad_enabled(False)
        if "generate" in args.parts:
            rows += run_generate(args, model)
        if "prefill" in args.parts:
            rows += run_prefill(args, model)
    return rows


def _spin(n: int) -> list:
    """``n`` processes that spin on a core each until killed (the busy-machine measurement)."""
    import subprocess
    import sys

    if n < 0:
        raise SystemExit(f"--busy must be >= 0, got {n}")
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _run_gpu(args) -> int:
    """``--device cuda``: the GPU parts (:mod:`kvpack.bench.gpu`), written as bench.json and bench.md."""
    import torch

    from kvpack.bench import gpu
    from kvpack.kernels import gpu as triton_status

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible here (torch.cuda.is_available() is False)")
    if reason := triton_status.available():
        print(f"warning: {reason}: kvpack's rows run the pure-torch reference")
    device = torch.device("cuda")
    properties = torch.cuda.get_device_properties(device)
    import triton

    info = {"gpu": properties.name, "memory_gb": properties.total_memory / 1e9, "sms": properties.multi_processor_count,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}  # fmt: skip
    print(f"machine: {info['gpu']} ({info['memory_gb']:.0f} GB, {info['sms']} SMs), torch {info['torch']}, "
          f"triton {info['triton']}, CUDA {info['cuda']}")  # fmt: skip
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    if "attention" in args.parts:
        rows += gpu.run_attention(args, device)
    if "generate" in args.parts:
        from kvpack.bench import run_generate

        model = gpu.random_model(args.model_shape, args.dtype, device)
        torch.set_grad_enabled(False)
        print(f"\nrandom {args.model_shape} model ({sum(p.numel() for p in model.parameters()) / 1e9:.1f}B parameters, "
              f"{args.dtype}) for the generate part")  # fmt: skip
        rows += run_generate(args, model)
        del model
    if "prefill" in args.parts:
        print("(prefill is not measured with --device cuda)")
    (out_dir / "bench.json").write_text(json.dumps({"machine": info, "args": vars(args) | {"_run": None}, "rows": rows},
                                                   indent=1, default=str))  # fmt: skip
    (out_dir / "bench.md").write_text(gpu.markdown(rows, info))
    note = gpu.plot(rows, out_dir / "bench.png")
    print(
        f"\nwrote {out_dir / 'bench.json'}, {out_dir / 'bench.md'}"
        + (f"; {note}" if note else f", {out_dir / 'bench.png'}")
    )
    return 0
