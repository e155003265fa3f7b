#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU, run kvpack's GPU tests natively and the GPU benchmark,
# writing everything into OUT_DIR. Needs nothing from the network; budget: under 8 minutes on an H200.
#
#   bash scripts/gpu_check.sh OUT_DIR            # run it (from anywhere)
#   bash scripts/gpu_check.sh --dry-run OUT_DIR  # print the steps' commands only
#
# Uses the machine's own python3 (torch, triton, pytest; transformers for step 4) with kvpack from src/ of
# this checkout: nothing is installed into that Python. Wheels in .whl/ (see docs/PERFORMANCE.md, "GPU"),
# e.g. the transformers version kvpack pins, are installed into a temporary folder first when present.
# Each step has its own time limit and the script goes on after a failed step; the summary at the end and
# OUT_DIR/gpu_check.log say what passed. Exit status: the number of failed steps.
#
# Writes (6 files, 2 folders deep): gpu_check.log (every step's output), attention/bench.{json,md,png},
# generate/bench.{json,md}.
#
# Environment: PYTHON (default python3).
set -uo pipefail

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
if [ $# -ne 1 ]; then
    echo "usage: bash scripts/gpu_check.sh [--dry-run] OUT_DIR" >&2
    exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="$(mkdir -p "$1" && cd "$1" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

TESTS=(tests/kernels/test_triton.py tests/test_devices.py)
# A Llama-3-8B layer (32 q / 8 kv heads, head_dim 128), bf16: the issue's targets at 4k/batch 1 and 32k/batch 16,
# and 128k at batch 1.
ATTENTION=(bench --device cuda --parts attention --heads 32 --kv-heads 8 --head-dim 128 --dtype bfloat16
           --context 4096 32768 131072 --batch 1 16 --max-cache-gb 20 --out "$out/attention")
# End to end: a random Llama-3-8B-shaped model, 32k prompt, the batch that fits 40 GB of KV cache per method.
GENERATE=(bench --device cuda --parts generate --model-shape llama3-8b --dtype bfloat16 --gen-context 32768
          --gen-batch 1 8 --gen-tokens 16 --repeat 2 --memory-budget-gb 40
          --gen-methods "bf16 DynamicCache" "kvpack KIVI-2" "kvpack KIVI-4" "kvpack turbo-K4V2"
          --out "$out/generate")

if [ "$dry" -eq 1 ]; then
    printf '%q ' "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"; echo
    printf '%q ' "$PY" -m kvpack.cli "${ATTENTION[@]}"; echo
    printf '%q ' "$PY" -m kvpack.cli "${GENERATE[@]}"; echo
    exit 0
fi

log="$out/gpu_check.log"
: > "$log"
say() { printf '[gpu_check %s] %s\n' "$(date +%T)" "$*" | tee -a "$log"; }
failed=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log its tail, count a failure
    local name="$1" limit="$2"; shift 2
    say "$name: $* (limit ${limit}s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    say "$name: exit $rc after $((SECONDS - start))s"
    if [ $rc -ne 0 ]; then failed=$((failed + 1)); fi
}

# 0. The machine and the wheels carried along.
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv >> "$log" 2>&1
if compgen -G ".whl/*.whl" > /dev/null; then
    say "installing the carried wheels into /tmp/kvpack-site: $(ls .whl | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kvpack-site \
        .whl/*.whl >> "$log" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/kvpack-site"
fi
"$PY" - >> "$log" 2>&1 <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0))
for name in ("triton", "transformers", "pytest", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:
        print(name, "unavailable:", err)
EOF

# 1. The GPU tests, natively (the same tests run on the CPU through Triton's interpreter in CI).
step tests 120 "$PY" -m pytest -q -p no:cacheprovider -ra "${TESTS[@]}"

# 2. Decode attention: kvpack's Triton steps against SDPA (flash) over the bf16 cache.
step attention 180 "$PY" -m kvpack.cli "${ATTENTION[@]}"

# 3. End to end on a random model (needs transformers; kvpack pins 5.24: carry its wheel if the machine's fails).
step generate 150 "$PY" -m kvpack.cli "${GENERATE[@]}"

say "done: $failed failed step(s); results in $out"
exit "$failed"
