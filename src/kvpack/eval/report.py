"""Writing an :class:`~kvpack.eval.matrix.EvalRun` out: Markdown, CSV, JSON and PNG plots.

Files in the results folder:

* ``results.md``: conditions, the summary table, retrieval accuracy by length, memory, distortion, timing;
* ``results.csv``: the summary table, one row per method, unformatted numbers;
* ``retrieval.csv``: one row per (method, retrieval sample);
* ``results.json``: the resolved config, environment (versions, machine), timings and every measurement;
* ``quality_vs_bits.png``, ``passkey_vs_length.png``, ``niah_vs_length.png``, ``distortion_per_layer.png``
  (each only when its suite ran).
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import math
import os
from pathlib import Path
from typing import Any

from ..config import SCALE_DTYPES
from .matrix import EvalRun

__all__ = ["SUMMARY_COLUMNS", "environment", "markdown", "summary_rows", "write_report"]

#: Columns of the summary table: (key, Markdown header, format).
SUMMARY_COLUMNS = (
    ("method", "method", "{}"),
    ("bits", "bits/elem", "{:.2f}"),
    ("compression", "x fp16", "{:.2f}"),
    ("ppl", "ppl", "{:.3f}"),
    ("kl", "KL to fp", "{:.4f}"),
    ("top1", "top-1 agree", "{:.3f}"),
    ("attn_err", "attn rel err", "{:.4f}"),
    ("passkey", "passkey", "{:.2f}"),
    ("niah_single_1", "NIAH single", "{:.2f}"),
    ("niah_multikey_2", "NIAH multikey", "{:.2f}"),
)

_TASK_TITLES = {"passkey": "passkey", "niah_single_1": "NIAH single_1", "niah_multikey_2": "NIAH multikey_2"}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    """``<commit>`` or ``<commit>+dirty`` of the kvpack checkout, None outside a git checkout."""
    import subprocess

    folder = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if status else "")


def environment() -> dict[str, Any]:
    """Versions and machine (:func:`kvpack.machine.machine_info`), the date, and the git revision."""
    from .. import __version__
    from ..machine import machine_info

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **machine_info(),
        "kvpack": __version__,
        "git": _git_revision(),
        "transformers": _version("transformers"),
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _retrieval_accuracy(run: EvalRun, label: str, task: str) -> float:
    return _mean(o.correct for o in run.retrieval.get(label, []) if o.task == task)


def _tasks(run: EvalRun) -> list[str]:
    seen = []
    for outcomes in run.retrieval.values():
        for outcome in outcomes:
            if outcome.task not in seen:
                seen.append(outcome.task)
    return seen


def quality_bits(run: EvalRun) -> dict[str, float]:
    """Effective bits per element of each method at the longest measured memory length (NaN if none)."""
    out = {}
    for label in run.labels:
        rows = run.memory.get(label)
        out[label] = max(rows, key=lambda r: r.tokens).bits_per_element if rows else math.nan
    return out


def summary_rows(run: EvalRun) -> list[dict[str, Any]]:
    """One dict per method with the keys of :data:`SUMMARY_COLUMNS` that were measured (NaN otherwise)."""
    bits = quality_bits(run)
    rows = []
    for label in run.labels:
        memory = run.memory.get(label)
        ppl = run.perplexity.get(label)
        distortion = run.distortion.get(label)
        row = {
            "method": label,
            "bits": bits[label],
            "compression": max(memory, key=lambda r: r.tokens).compression if memory else math.nan,
            "ppl": ppl.ppl if ppl else math.nan,
            "kl": ppl.kl if ppl else math.nan,
            "top1": ppl.top1 if ppl else math.nan,
            "attn_err": distortion.mean
            if distortion
            else (0.0 if run.distortion and label not in run.distortion else math.nan),
        }
        for task in ("passkey", "niah_single_1", "niah_multikey_2"):
            row[task] = _retrieval_accuracy(run, label, task)
        rows.append(row)
    return rows


def _present_columns(rows: list[dict[str, Any]]):
    return [c for c in SUMMARY_COLUMNS if c[0] == "method" or any(not _isnan(r[c[0]]) for r in rows)]


def _isnan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _fmt(value, spec: str) -> str:
    return "-" if _isnan(value) else spec.format(value)


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def summary_table(run: EvalRun) -> str:
    """The summary table in Markdown (only the columns that were measured)."""
    rows = summary_rows(run)
    columns = _present_columns(rows)
    header = [c[1] for c in columns]
    if run.memory:
        longest = max(run.config.memory.lengths)
        header = [f"{h} @{longest}" if c[0] in ("bits", "compression") else h for h, c in zip(header, columns)]
    return _table(header, [[_fmt(r[c[0]], c[2]) for c in columns] for r in rows])


def _conditions(run: EvalRun) -> list[str]:
    config = run.config
    notes = []
    if run.memory:
        longest = max(config.memory.lengths)
        notes.append(
            f"bits/elem and x fp16: bytes held by the whole cache at {longest} tokens "
            f"(residual, scales and metadata included; {config.memory.dtype} inputs)"
            + (
                f", the mean over {config.memory.cycle} lengths of one key flush cycle from there"
                if config.memory.cycle > 1
                else ""
            )
            + ", fp16 = 16 bits."
        )
    if run.perplexity:
        p = config.ppl
        notes.append(
            f"ppl, KL (fp || method, nats, mean per position) and top-1 agreement with fp: {p.text_file or p.book}, {p.windows} "
            f"window(s) of {p.prefill} prefill tokens then {p.tokens} tokens fed one at a time through the cache."
        )
    if run.distortion:
        d = config.distortion
        notes.append(
            f"attn rel err: |p_hat - p| / |p| of the attention weights, mean over layers, for the last {d.queries} "
            f"queries of {d.context} tokens of {d.text_file or d.book}, appended one at a time."
        )
    if run.retrieval:
        parts = []
        for suite in ("passkey", "niah"):
            if suite in config.suites:
                s = getattr(config, suite)
                parts.append(
                    f"{'/'.join(s.tasks)} at lengths {list(s.lengths)} x depths {list(s.depths)} x {s.samples} sample(s)"
                )
        whole = any(getattr(config, s).question_in_prefill for s in ("passkey", "niah") if s in config.suites)
        mode = "prompt prefilled whole" if whole else "context prefilled, question and answer through the cache"
        notes.append(
            f"retrieval accuracy (exact match of the first integer, greedy, {mode}): " + "; ".join(parts) + "."
        )
    return notes


def markdown(run: EvalRun) -> str:
    """The whole ``results.md``."""
    env, config = run.environment, run.config
    lines = ["# kvpack eval", ""]
    model = config.model or "SmolLM2-135M-Instruct (embedded)"
    attention = "fused kvpack attention" if config.fused else "compat attention (dequantized K/V)"
    lines.append(f"Model: {model}; {attention}.  ")
    if env:
        lines.append(
            f"Machine: {env.get('cpu')}, {env.get('usable_cores')} usable cores, torch {env.get('torch')} "
            f"({env.get('torch_threads')} threads), transformers {env.get('transformers')}, kvpack {env.get('kvpack')}; "
            f"load average at start {env.get('load_average')}.  "
        )
    if "total" in run.seconds:
        cpu = run.cpu_seconds.get("total")
        lines.append(f"Wall time: {run.seconds['total']:.0f} s" + (f" ({cpu:.0f} s CPU)." if cpu is not None else "."))
    lines += ["", "## Summary", "", summary_table(run), ""]
    lines += [f"- {note}" for note in _conditions(run)]
    tasks = _tasks(run)
    if tasks:
        lines += ["", "## Retrieval accuracy by context length", ""]
        for task in tasks:
            lengths = sorted({o.length for outcomes in run.retrieval.values() for o in outcomes if o.task == task})
            body = []
            for label in run.labels:
                by_length = []
                for length in lengths:
                    hits = [o.correct for o in run.retrieval.get(label, []) if o.task == task and o.length == length]
                    by_length.append(_fmt(_mean(hits), "{:.2f}"))
                body.append([label] + by_length)
            lines += [f"{_TASK_TITLES.get(task, task)}:", "", _table(["method"] + [str(n) for n in lengths], body), ""]
    if run.memory:
        lengths = list(config.memory.lengths)
        body = []
        for label in run.labels:
            rows = run.memory.get(label, [])
            longest = max(rows, key=lambda r: r.tokens)
            body.append(
                [label]
                + [f"{r.bits_per_element:.2f}" for r in rows]
                + [f"{longest.bytes_per_token:,.0f}", f"{longest.compression:.2f}"]
            )
        header = ["method"] + [f"bits @ {n}" for n in lengths] + [f"bytes/token @ {max(lengths)}", "x fp16"]
        lines += ["## Memory (whole cache, batch 1)", "", _table(header, body), ""]
    if run.memory_curve:
        m = config.memory
        own = SCALE_DTYPES[m.curve_dtype].itemsize
        body = []
        for label, rows in run.memory_curve.items():
            shortest = min(rows, key=lambda r: r.tokens)
            even16, even_own = break_even(rows, 2), break_even(rows, own)
            body.append([label, f"{shortest.nbytes / (shortest.fp16_nbytes * own / 2):.2f}",
                         str(even16) if even16 else f"> {max(m.curve)}", str(even_own) if even_own else f"> {max(m.curve)}"])  # fmt: skip
        lines += [f"Short contexts, {m.curve_dtype} keys/values (the fp residual holds the model's dtype):", "",
                  _table(["method", f"x {m.curve_dtype} cache @ {min(m.curve)}", "smaller than fp16 from",
                          f"smaller than {m.curve_dtype} from"], body), ""]  # fmt: skip
    if run.kld:
        k = config.kld
        body = [[label, f"{r.kl:.4f}", f"{100 * r.top1:.1f}%", f"{r.ppl:.3f}"] for label, r in run.kld.items()]
        lines += ["## llama.cpp's KL-divergence protocol", "",
                  f"`llama-perplexity --kl-divergence` as llama.cpp users run it: {k.chunks} chunk(s) of {k.chunk} "
                  f"tokens of {k.text_file or k.book}, each fed from an empty cache in micro-batches of {k.ubatch}; "
                  f"KL to the fp cache over each chunk's second half (fp ppl {next(iter(run.kld.values())).fp_ppl:.3f}).",
                  "", _table(["method", "mean KLD", "same top token", "ppl"], body), ""]  # fmt: skip
    if run.distortion:
        body = []
        for label, result in run.distortion.items():
            body.append([label, f"{result.mean:.4f}", f"{result.max:.4f}", str(result.worst_layer)])
        lines += ["## Attention distortion", ""]
        first = next(iter(run.distortion.values()))
        if first.layers and len(first.layers) != first.layers[-1] + 1:  # some layers slide: say which are measured
            lines += [f"Full-attention layers {first.layers} (sliding-window layers are not measured).", ""]
        lines += [_table(["method", "mean over layers", "max", "worst layer"], body), ""]
    if run.seconds:
        body = [[k, f"{v:.1f}", _fmt(run.cpu_seconds.get(k, math.nan), "{:.1f}")] for k, v in run.seconds.items()]
        lines += ["## Time", "", _table(["part", "wall s", "CPU s"], body), ""]
    return "\n".join(lines).rstrip() + "\n"


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _nan_to_none(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# --- plots ----------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'kvpack[eval]'") from err
    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _colors(run: EvalRun) -> dict[str, Any]:
    """One color per method, the same in every plot."""
    palette = [f"C{i}" for i in range(10)]
    return {label: palette[i % len(palette)] for i, label in enumerate(run.labels)}


def _plot_quality(run: EvalRun, path: Path) -> None:
    rows = [r for r in summary_rows(run) if not _isnan(r["bits"]) and not _isnan(r["ppl"])]
    fig = _figure(9, 3.6)
    ax_ppl, ax_kl = fig.subplots(1, 2)
    colors = _colors(run)
    fp_ppl = next((r["ppl"] for r in rows if r["kl"] == 0.0), None)
    for row in rows:
        color = colors[row["method"]]
        ax_ppl.scatter(row["bits"], row["ppl"], color=color)
        ax_ppl.annotate(row["method"], (row["bits"], row["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if row["kl"] > 0:
            ax_kl.scatter(row["bits"], row["kl"], color=color)
            ax_kl.annotate(
                row["method"], (row["bits"], row["kl"]), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
    if fp_ppl is not None:
        ax_ppl.axhline(fp_ppl, color="gray", linestyle=":", linewidth=1, label="fp")
        ax_ppl.legend(fontsize=8)
    bits_label = f"effective bits per element at {max(run.config.memory.lengths)} tokens"
    ax_ppl.set_xlabel(bits_label)
    ax_ppl.set_ylabel("decode perplexity")
    ax_kl.set_xlabel(bits_label)
    ax_kl.set_ylabel("KL(fp || method), nats")
    ax_kl.set_yscale("log")
    for ax in (ax_ppl, ax_kl):
        ax.grid(alpha=0.3)
    p = run.config.ppl
    fig.suptitle(
        f"Quality vs memory ({p.prefill} prefill + {p.tokens} decoded tokens, {p.text_file or p.book})", fontsize=10
    )
    fig.savefig(path)


def _plot_retrieval(run: EvalRun, tasks: list[str], path: Path, title: str) -> None:
    fig = _figure(4.2 * len(tasks), 3.4)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    colors = _colors(run)
    for ax, task in zip(axes, tasks):
        for label in run.labels:
            outcomes = [o for o in run.retrieval.get(label, []) if o.task == task]
            lengths = sorted({o.length for o in outcomes})
            accuracy = [_mean(o.correct for o in outcomes if o.length == n) for n in lengths]
            ax.plot(
                lengths,
                accuracy,
                marker="o",
                label=label,
                color=colors[label],
                linestyle="--" if label == "fp" else "-",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(_TASK_TITLES.get(task, task), fontsize=10)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)


def _plot_distortion(run: EvalRun, path: Path) -> None:
    fig = _figure(6, 3.4)
    ax = fig.subplots()
    colors = _colors(run)
    for label, result in run.distortion.items():
        ax.plot(result.layers or range(len(result.per_layer)), result.per_layer, marker=".", label=label,
                color=colors[label])  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("attention weights rel. L2 error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    d = run.config.distortion
    fig.suptitle(f"Attention distortion per layer ({d.context} tokens, last {d.queries} queries)", fontsize=10)
    fig.savefig(path)


def break_even(rows, dtype_bytes: int) -> int | None:
    """The shortest context of ``rows`` (a memory curve) from which the cache holds fewer bytes than an fp
    cache of ``dtype_bytes`` per element, or None."""
    for row in sorted(rows, key=lambda r: r.tokens):
        if row.nbytes < row.fp16_nbytes * dtype_bytes // 2:
            return row.tokens
    return None


def _plot_memory(run: EvalRun, path: Path) -> None:
    m = run.config.memory
    own = SCALE_DTYPES[m.curve_dtype].itemsize
    fig = _figure(6, 3.6)
    ax = fig.subplots()
    colors = _colors(run)
    for label, rows in run.memory_curve.items():
        ax.plot([r.tokens for r in rows], [r.nbytes / 1e6 for r in rows], marker=".", label=label, color=colors[label])
    any_rows = next(iter(run.memory_curve.values()))
    tokens = [r.tokens for r in any_rows]
    ax.plot(tokens, [r.fp16_nbytes / 1e6 for r in any_rows], "k--", label="fp16 DynamicCache")
    if own != 2:
        ax.plot(tokens, [r.fp16_nbytes * own / 2e6 for r in any_rows], "k:", label=f"{m.curve_dtype} DynamicCache")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("KV cache MB (batch 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"Bytes held against context ({m.curve_dtype} model): the break-even with the fp caches", fontsize=10)
    fig.savefig(path)


def write_report(run: EvalRun, out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
    """Write every report file of ``run`` into ``out_dir`` (created if needed).

    Returns:
        name -> path of each file written.

    Raises:
        ImportError: ``plots`` and matplotlib is missing.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    files["results.md"] = out / "results.md"
    files["results.md"].write_text(markdown(run))

    rows = summary_rows(run)
    columns = _present_columns(rows)
    files["results.csv"] = out / "results.csv"
    _write_csv(files["results.csv"], [c[0] for c in columns], [[r[c[0]] for c in columns] for r in rows])

    if run.retrieval:
        files["retrieval.csv"] = out / "retrieval.csv"
        fields = ["label", "task", "length", "depth", "needle_depth", "answer", "prediction", "correct", "output"]
        _write_csv(
            files["retrieval.csv"],
            fields,
            [[o.to_dict()[f] for f in fields] for outcomes in run.retrieval.values() for o in outcomes],
        )

    files["results.json"] = out / "results.json"
    files["results.json"].write_text(json.dumps(_nan_to_none(run.to_dict()), indent=2, default=_json_default) + "\n")

    if plots:
        if run.perplexity and run.memory:
            files["quality_vs_bits.png"] = out / "quality_vs_bits.png"
            _plot_quality(run, files["quality_vs_bits.png"])
        tasks = _tasks(run)
        if "passkey" in tasks:
            files["passkey_vs_length.png"] = out / "passkey_vs_length.png"
            _plot_retrieval(run, ["passkey"], files["passkey_vs_length.png"], "Passkey retrieval accuracy")
        niah = [t for t in tasks if t.startswith("niah")]
        if niah:
            files["niah_vs_length.png"] = out / "niah_vs_length.png"
            _plot_retrieval(run, niah, files["niah_vs_length.png"], "RULER needle-in-a-haystack accuracy")
        if run.distortion:
            files["distortion_per_layer.png"] = out / "distortion_per_layer.png"
            _plot_distortion(run, files["distortion_per_layer.png"])
        if run.memory_curve:
            files["memory_vs_length.png"] = out / "memory_vs_length.png"
            _plot_memory(run, files["memory_vs_length.png"])
    return files
