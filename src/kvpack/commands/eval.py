"""``kvpack eval``: quality, retrieval, attention distortion and memory of every method on a real model.

Settings are layered: defaults (the full run, or the quick preset with ``--quick``) < a YAML file
(``--config``, same keys as ``results.json``'s ``config``) < the flags below. The results folder gets
results.md / .csv / .json and PNG plots (see :mod:`kvpack.eval.report`); the summary table is printed.
"""

from __future__ import annotations

HELP = "evaluate every method (perplexity, passkey/NIAH retrieval, attention distortion, memory) and write a report"

#: kvpack.eval.matrix.SUITES, spelled out so that ``kvpack --help`` imports no eval code (a test checks they agree).
_SUITES = ("ppl", "kld", "passkey", "niah", "distortion", "memory")


def _csv(kind):
    def parse(text: str):
        return [kind(item) for item in text.split(",") if item.strip()]

    return parse


def add_arguments(parser) -> None:
    parser.add_argument("--config", metavar="YAML", help="YAML file of settings (between the defaults and the flags)")
    parser.add_argument("--quick", action="store_true", help="small preset: a few minutes on 2 cores")
    parser.add_argument(
        "--suites", type=_csv(str), metavar="LIST", help=f"comma-separated subset of {','.join(_SUITES)}"
    )
    parser.add_argument(
        "--methods",
        type=_csv(str),
        metavar="LIST",
        help="comma-separated method labels of the default matrix (fp,KIVI-4,KIVI-2,QJL-128,QJL-256, then other "
        "registered methods by name, then turbo-K4V2, then the presets: kv3,kv3-lite,kv3-plus,kv4,kv8); fp is "
        "always included",
    )
    parser.add_argument("--out", metavar="DIR", help="results folder (default results/eval-<timestamp>)")
    parser.add_argument("--model", help="local model folder or .gguf file, or gemma3-270m (optional: setup.sh "
                        "--gemma); default: the embedded SmolLM2-135M-Instruct")  # fmt: skip
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, help="seed of retrieval samples and memory fills")
    parser.add_argument("--book", help="Austen novel for perplexity and distortion (default prideprejudice)")
    parser.add_argument("--text", metavar="FILE",
                        help="a UTF-8 text file of your own for perplexity and distortion (instead of --book)")  # fmt: skip
    parser.add_argument("--prefill", type=int, help="perplexity: prompt tokens per window")
    parser.add_argument("--tokens", type=int, help="perplexity: tokens scored one at a time after the prompt")
    parser.add_argument("--windows", type=int, help="perplexity: text windows")
    parser.add_argument(
        "--lengths", type=_csv(int), metavar="LIST", help="passkey and NIAH context lengths, comma-separated"
    )
    parser.add_argument("--depths", type=_csv(float), metavar="LIST", help="passkey and NIAH needle depths in [0, 1]")
    parser.add_argument(
        "--compat", action="store_true", help="compat attention (dequantized K/V) instead of the fused path"
    )
    parser.add_argument(
        "--no-share-prefill", action="store_true", help="run every method's own prefill instead of copying the fp one"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _flag_changes(args) -> dict:
    """The settings the command-line flags set, as a partial ``EvalConfig.to_dict()``."""
    changes: dict = {}
    for name in ("suites", "model", "threads", "seed"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.methods is not None:
        changes["methods"] = args.methods
    if args.compat:
        changes["fused"] = False
    if args.no_share_prefill:
        changes["share_prefill"] = False
    ppl = {k: getattr(args, k) for k in ("prefill", "tokens", "windows") if getattr(args, k) is not None}
    if args.book is not None and args.text is not None:
        raise SystemExit("--book and --text are alternatives; give one")
    if args.book is not None:
        ppl["book"] = args.book
        changes["distortion"] = changes["kld"] = {"book": args.book}
    if args.text is not None:
        ppl["text_file"] = args.text
        changes["distortion"] = changes["kld"] = {"text_file": args.text}
    if ppl:
        changes["ppl"] = ppl
    sweep = {k: getattr(args, k) for k in ("lengths", "depths") if getattr(args, k) is not None}
    if sweep:
        changes["passkey"] = dict(sweep)
        changes["niah"] = dict(sweep)
    return changes


def _read_yaml(path: str) -> dict:
    try:
        import yaml
    except ImportError as err:
        raise ImportError("--config needs PyYAML: pip install 'kvpack[eval]'") from err
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def resolve_config(args):
    """defaults (full or quick) < YAML < flags."""
    from kvpack.eval import FULL, QUICK

    config = QUICK if args.quick else FULL
    if args.config:
        config = config.merged(_read_yaml(args.config))
    return config.merged(_flag_changes(args))


def run(args) -> int:
    import datetime
    import logging
    import sys
    import time
    from pathlib import Path

    import torch

    import kvpack
    from kvpack.eval import environment, run_matrix, write_report
    from kvpack.eval.report import summary_table

    logger = logging.getLogger("kvpack.eval")
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        config = resolve_config(args)
    except (ValueError, OSError) as err:
        print(f"kvpack eval: {err}", file=sys.stderr)
        return 2
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    out = Path(args.out or f"results/eval-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    env = environment()
    logger.info("methods: %s; suites: %s", ", ".join(m.label for m in config.methods), ", ".join(config.suites))

    load_start, load_cpu_start = time.perf_counter(), time.process_time()
    model, tokenizer = kvpack.load_model(config.model)
    if config.fused:
        kvpack.enable(model)
    load_seconds, load_cpu = time.perf_counter() - load_start, time.process_time() - load_cpu_start

    result = run_matrix(model, tokenizer, config, progress=not args.no_progress)
    result.environment = env
    result.seconds = {"load": round(load_seconds, 2), **result.seconds, "total": round(time.perf_counter() - start, 2)}
    result.cpu_seconds = {
        "load": round(load_cpu, 2),
        **result.cpu_seconds,
        "total": round(time.process_time() - cpu_start, 2),
    }
    files = write_report(result, out, plots=not args.no_plots)
    print(summary_table(result))
    print(
        f"\n{len(files)} files in {out}/ ({result.seconds['total']:.0f} s, {result.cpu_seconds['total']:.0f} s CPU): "
        + ", ".join(files)
    )
    return 0
