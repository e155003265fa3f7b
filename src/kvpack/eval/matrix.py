"""The method matrix and the evaluation config, and :func:`run_matrix`, which runs every suite on every method.

Config layering (the ``kvpack eval`` command): defaults (:data:`FULL` or, with ``--quick``, :data:`QUICK`)
< a YAML file (``--config``) < command-line flags. A YAML file mirrors :meth:`EvalConfig.to_dict`; any
subset of keys may be given, and a section replaces only the fields it names::

    suites: [ppl, passkey, memory]
    methods:                      # labels of the default matrix, or new entries
      - fp
      - KIVI-2
      - {label: KIVI-2 R32, method: kivi, residual_length: 32}
    ppl: {prefill: 1024, tokens: 64}
    passkey: {lengths: [1024, 4096], depths: [0.5]}
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import MethodConfig
from ..registry import config_class, method_names

__all__ = [
    "FULL",
    "QUICK",
    "SUITES",
    "DistortionSettings",
    "EvalConfig",
    "EvalRun",
    "MemorySettings",
    "MethodSpec",
    "PerplexitySettings",
    "RetrievalSettings",
    "default_methods",
    "run_matrix",
]

logger = logging.getLogger(__name__)

SUITES = ("ppl", "kld", "passkey", "niah", "distortion", "memory")


# --- the method matrix ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One column of the matrix: a label and a method config (None: the fp ``DynamicCache``), or a preset
    (:mod:`kvpack.presets`: its config and per-layer settings)."""

    label: str
    config: MethodConfig | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"label must be a non-empty string, got {self.label!r}")
        if self.preset is not None:
            from ..presets import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
            object.__setattr__(self, "config", PRESETS[self.preset].config)
        if self.config is not None and not isinstance(self.config, MethodConfig):
            raise TypeError(f"config must be a kvpack MethodConfig or None, got {type(self.config).__name__}")

    @property
    def is_fp(self) -> bool:
        return self.config is None

    def cache_factory(self):
        """``factory(model)`` -> a fresh kvpack cache, or None for fp."""
        if self.config is None:
            return None
        what = self.preset or self.config

        def factory(model):
            from ..hf import make_cache

            return make_cache(model, what)

        return factory

    def layer_settings(self, num_layers: int) -> tuple[dict[int, MethodConfig], tuple[int, ...]]:
        """(per-layer configs, skipped layers) of a preset for a model of ``num_layers`` layers; empty else."""
        if self.preset is None:
            return {}, ()
        from ..presets import PRESETS

        preset = PRESETS[self.preset]
        return preset.layer_configs(num_layers), preset.skip_layers(num_layers)

    def layer_config(self, num_layers: int):
        """``layer index -> config`` (None: a full-precision layer) for the distortion suite."""
        per_layer, skipped = self.layer_settings(num_layers)
        return lambda i: None if i in skipped else per_layer.get(i, self.config)

    def to_dict(self) -> dict[str, Any]:
        if self.preset is not None:
            return {"label": self.label, "preset": self.preset}
        if self.config is None:
            return {"label": self.label, "method": "fp"}
        return {"label": self.label, **self.config.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str) -> MethodSpec:
        """From :meth:`to_dict` output, or a label of :func:`default_methods`.

        Raises:
            ValueError: unknown label, method or config field.
        """
        if isinstance(data, str):
            by_label = {spec.label.lower(): spec for spec in default_methods()}
            try:
                return by_label[data.lower()]
            except KeyError:
                raise ValueError(
                    f"method label must be one of {[s.label for s in default_methods()]} "
                    f"(or a mapping with 'method'), got {data!r}"
                ) from None
        fields = dict(data)
        if "preset" in fields:
            preset = fields.pop("preset")
            label = fields.pop("label", preset)
            if fields:
                raise ValueError(f"a preset entry takes only 'preset' and 'label', got {sorted(fields)}")
            return cls(label, preset=preset)
        method = fields.pop("method", None)
        label = fields.pop("label", None)
        if method is None:
            if label is None or fields:
                raise ValueError(f"a method entry needs 'method' (fp or one of {method_names()}), got {dict(data)}")
            return cls.from_dict(label)
        if method == "fp":
            if fields:
                raise ValueError(f"the fp method takes no fields, got {sorted(fields)}")
            return cls(label or "fp")
        config = config_class(method).from_dict(fields)
        return cls(label or method, config)


def default_methods() -> list[MethodSpec]:
    """fp, then every registered method's named settings (:func:`kvpack.variants`: KIVI-4, KIVI-2, QJL at
    m = 2d and 4d (d = 64), turbo, and turbo with 4-bit keys and 2-bit values, ...)."""
    from ..presets import PRESETS
    from ..registry import variants

    methods = [MethodSpec("fp")] + [MethodSpec(label, config) for label, config in variants().items()]
    return methods + [MethodSpec(name, preset=name) for name in PRESETS]


# --- settings -----------------------------------------------------------------------------------------


def _positive_ints(name: str, values) -> tuple[int, ...]:
    values = tuple(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {list(values)!r}")
    return values


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class _Section:
    """Common ``to_dict`` / ``merged`` of the settings dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    def merged(self, changes: Mapping[str, Any], section: str) -> _Section:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown {section} settings {unknown}; allowed: {sorted(names)}")
        changes = {k: (tuple(v) if isinstance(v, list) else v) for k, v in changes.items()}
        return dataclasses.replace(self, **changes)


def _check_text_file(value) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"text_file must be a path or None, got {value!r}")


def corpus(book: str, text_file: str | None = None) -> str:
    """The text a suite reads: the UTF-8 file ``text_file`` (any text a user brings), else the Austen novel
    ``book``.

    Raises:
        ValueError: the file cannot be read, is not UTF-8, or holds no text.
    """
    if text_file is None:
        from ..data import austen_text

        return austen_text(book)
    try:
        data = Path(text_file).read_bytes()
    except OSError as err:
        raise ValueError(f"text file {text_file}: cannot be read ({err.strerror or err})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"text file {text_file} is not UTF-8 text (invalid byte at offset {err.start})") from None
    if not text.strip():
        raise ValueError(f"text file {text_file} holds no text")
    return text


@dataclasses.dataclass(frozen=True)
class PerplexitySettings(_Section):
    """Decode-mode quality (:func:`kvpack.eval.perplexity`): ``windows`` windows of ``book``, or of the UTF-8
    file ``text_file`` when set."""

    book: str = "prideprejudice"
    prefill: int = 2048
    tokens: int = 128
    windows: int = 2
    batch_size: int = 4
    text_file: str | None = None

    def __post_init__(self) -> None:
        for name in ("prefill", "tokens", "windows", "batch_size"):
            _positive_int(name, getattr(self, name))
        _check_text_file(self.text_file)


@dataclasses.dataclass(frozen=True)
class RetrievalSettings(_Section):
    """A retrieval sweep (:func:`kvpack.eval.retrieval`): ``tasks`` x ``lengths`` x ``depths`` x ``samples``."""

    tasks: tuple[str, ...] = ("passkey",)
    lengths: tuple[int, ...] = (1024, 2048)
    depths: tuple[float, ...] = (0.25, 0.75)
    samples: int = 5
    max_new_tokens: int = 12
    batch_size: int = 4
    question_in_prefill: bool = False

    def __post_init__(self) -> None:
        from .retrieval import RETRIEVAL_TASKS

        if not self.tasks or any(t not in RETRIEVAL_TASKS for t in self.tasks):
            raise ValueError(f"tasks must be a non-empty list of {RETRIEVAL_TASKS}, got {list(self.tasks)!r}")
        _positive_ints("lengths", self.lengths)
        if not self.depths or any(isinstance(d, bool) or not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"depths must be a non-empty list of numbers in [0, 1], got {list(self.depths)!r}")
        for name in ("samples", "max_new_tokens", "batch_size"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.question_in_prefill, bool):
            raise ValueError(f"question_in_prefill must be one of (True, False), got {self.question_in_prefill!r}")


@dataclasses.dataclass(frozen=True)
class DistortionSettings(_Section):
    """Attention distortion (:func:`kvpack.eval.attention_distortion`) on ``context`` tokens of ``book`` (or of
    ``text_file``)."""

    book: str = "prideprejudice"
    context: int = 2048
    queries: int = 32
    text_file: str | None = None

    def __post_init__(self) -> None:
        _check_text_file(self.text_file)
        _positive_int("context", self.context)
        _positive_int("queries", self.queries)
        if self.queries > self.context:
            raise ValueError(f"queries must be at most context ({self.context}), got {self.queries}")


@dataclasses.dataclass(frozen=True)
class KLDSettings(_Section):
    """llama.cpp's ``--kl-divergence`` protocol (:func:`kvpack.eval.kl_divergence`): ``chunks`` consecutive
    chunks of ``chunk`` tokens of ``book`` (or ``text_file``), fed in ``ubatch``-token micro-batches, KL to fp
    over each chunk's second half."""

    book: str = "prideprejudice"
    chunk: int = 2048
    ubatch: int = 512
    chunks: int = 8
    text_file: str | None = None

    def __post_init__(self) -> None:
        _check_text_file(self.text_file)
        for name in ("chunk", "ubatch", "chunks"):
            _positive_int(name, getattr(self, name))
        if self.ubatch > self.chunk:
            raise ValueError(f"ubatch must be at most chunk ({self.chunk}), got {self.ubatch}")


@dataclasses.dataclass(frozen=True)
class MemorySettings(_Section):
    """Memory accounting (:func:`kvpack.eval.memory_footprint`) at ``lengths`` tokens."""

    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    dtype: str = "float16"
    cycle: int = 4  # lengths over one key flush cycle averaged per reported length (memory_footprint)
    #: Short contexts in the model's own dtype (the bytes-against-context plot: where each cache breaks even
    #: with an fp16 and a ``curve_dtype`` cache; below R tokens nothing is quantized yet).
    curve: tuple[int, ...] = (16, 32, 64, 128, 192, 256, 384, 512, 1024, 2048)
    curve_dtype: str = "float32"

    def __post_init__(self) -> None:
        _positive_ints("lengths", self.lengths)
        _positive_int("cycle", self.cycle)
        _positive_ints("curve", self.curve)
        if self.curve_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"curve_dtype must be one of ('float16', 'bfloat16', 'float32'), got {self.curve_dtype!r}")
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"dtype must be one of ('float16', 'bfloat16', 'float32'), got {self.dtype!r}")


_SECTIONS = {
    "ppl": PerplexitySettings,
    "passkey": RetrievalSettings,
    "niah": RetrievalSettings,
    "distortion": DistortionSettings,
    "kld": KLDSettings,
    "memory": MemorySettings,
}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Everything one ``kvpack eval`` run does.

    Args:
        suites: subset of :data:`SUITES`, run in that order.
        methods: the matrix (default: :func:`default_methods`); fp is added first when missing, since every
            quality number is relative to it.
        model: None for the embedded SmolLM2-135M-Instruct, or a local model folder / ``.gguf`` file.
        threads: torch CPU threads (None: torch's default).
        seed: seed of the retrieval samples and memory fills.
        fused: run the model with kvpack's fused attention (``kvpack.enable``); False uses the compat path.
        share_prefill: run each prompt's prefill once in fp and copy it into every method's cache.
        ppl, kld, passkey, niah, distortion, memory: per-suite settings.
    """

    suites: tuple[str, ...] = SUITES
    methods: tuple[MethodSpec, ...] = ()
    model: str | None = None
    threads: int | None = None
    seed: int = 0
    fused: bool = True
    share_prefill: bool = True
    ppl: PerplexitySettings = PerplexitySettings()
    passkey: RetrievalSettings = RetrievalSettings()
    niah: RetrievalSettings = RetrievalSettings(tasks=("niah_single_1",), lengths=(2048,), depths=(0.5,))
    distortion: DistortionSettings = DistortionSettings()
    kld: KLDSettings = KLDSettings()
    memory: MemorySettings = MemorySettings()

    def __post_init__(self) -> None:
        if not self.suites or any(s not in SUITES for s in self.suites):
            raise ValueError(f"suites must be a non-empty list of {SUITES}, got {list(self.suites)!r}")
        if len(set(self.suites)) != len(self.suites):
            raise ValueError(f"suites are listed twice: {list(self.suites)!r}")
        methods = tuple(self.methods) or tuple(default_methods())
        if not any(m.is_fp for m in methods):
            methods = (MethodSpec("fp"),) + methods
        labels = [m.label for m in methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"method labels must be unique, got {labels}")
        object.__setattr__(self, "methods", methods)
        if self.threads is not None:
            _positive_int("threads", self.threads)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "suites": list(self.suites),
            "methods": [m.to_dict() for m in self.methods],
            "model": self.model,
            "threads": self.threads,
            "seed": self.seed,
            "fused": self.fused,
            "share_prefill": self.share_prefill,
        }
        for name in _SECTIONS:
            out[name] = getattr(self, name).to_dict()
        return out

    def merged(self, changes: Mapping[str, Any]) -> EvalConfig:
        """A copy with ``changes`` (a partial :meth:`to_dict`) applied; sections merge field by field.

        Raises:
            ValueError: unknown keys or invalid values (the message names the allowed set).
        """
        allowed = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise ValueError(f"unknown eval settings {unknown}; allowed: {sorted(allowed)}")
        updates: dict[str, Any] = {}
        for key, value in changes.items():
            if key in _SECTIONS:
                if not isinstance(value, Mapping):
                    raise ValueError(f"{key} must be a mapping of settings, got {value!r}")
                updates[key] = getattr(self, key).merged(value, key)
            elif key == "methods":
                updates[key] = tuple(MethodSpec.from_dict(m) for m in value)
            elif key == "suites":
                updates[key] = tuple([value] if isinstance(value, str) else value)
            else:
                updates[key] = value
        return dataclasses.replace(self, **updates)


#: The full run: about 15 minutes on two CPU cores for the default matrix.
FULL = EvalConfig()

#: ``--quick``: a few minutes on two CPU cores.
QUICK = EvalConfig(
    ppl=PerplexitySettings(prefill=1024, tokens=64, windows=1),
    passkey=RetrievalSettings(lengths=(1024, 2048), depths=(0.25, 0.75), samples=1),
    niah=RetrievalSettings(tasks=("niah_single_1",), lengths=(1024,), depths=(0.5,), samples=1),
    distortion=DistortionSettings(context=1024, queries=16),
    kld=KLDSettings(chunks=1),
    memory=MemorySettings(lengths=(1024, 2048, 4096, 8192)),
)


# --- running ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalRun:
    """Everything a run measured; :mod:`kvpack.eval.report` writes it out.

    Attributes:
        config: the resolved config.
        environment: versions and machine (see :func:`kvpack.eval.report.environment`).
        seconds: wall time per suite (and ``"load"``, ``"total"``).
        cpu_seconds: CPU time of this process (all threads) per suite: on a shared machine, closer than wall
            time to what an idle one would take.
        perplexity: label -> :class:`~kvpack.eval.perplexity.PerplexityResult`.
        retrieval: label -> list of :class:`~kvpack.eval.retrieval.RetrievalOutcome` (passkey and NIAH).
        distortion: label -> :class:`~kvpack.eval.distortion.DistortionResult` (not for fp).
        kld: label -> :class:`~kvpack.eval.kld.KLDResult` (not for fp).
        memory: label -> list of :class:`~kvpack.eval.memory.MemoryRow`.
        memory_curve: label -> rows at the short contexts of ``memory.curve``, in ``memory.curve_dtype``.
    """

    config: EvalConfig
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    cpu_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    perplexity: dict[str, Any] = dataclasses.field(default_factory=dict)
    retrieval: dict[str, list] = dataclasses.field(default_factory=dict)
    distortion: dict[str, Any] = dataclasses.field(default_factory=dict)
    kld: dict[str, Any] = dataclasses.field(default_factory=dict)
    memory_curve: dict[str, list] = dataclasses.field(default_factory=dict)
    memory: dict[str, list] = dataclasses.field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return [m.label for m in self.config.methods]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "environment": self.environment,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "perplexity": {k: v.to_dict() for k, v in self.perplexity.items()},
            "retrieval": {k: [o.to_dict() for o in v] for k, v in self.retrieval.items()},
            "distortion": {k: v.to_dict() for k, v in self.distortion.items()},
            "kld": {k: v.to_dict() for k, v in self.kld.items()},
            "memory": {k: [r.to_dict() for r in v] for k, v in self.memory.items()},
            "memory_curve": {k: [r.to_dict() for r in v] for k, v in self.memory_curve.items()},
        }


def _timed(run: EvalRun, name: str):
    class _Timer:
        def __enter__(self):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def __exit__(self, *exc):
            run.seconds[name] = round(time.perf_counter() - self.start, 2)
            run.cpu_seconds[name] = round(time.process_time() - self.cpu_start, 2)
            logger.info("%s: %.1f s (%.1f s CPU)", name, run.seconds[name], run.cpu_seconds[name])

    return _Timer()


def run_matrix(model, tokenizer, config: EvalConfig, *, progress: bool = False) -> EvalRun:
    """Run ``config.suites`` on every method of ``config.methods``.

    The fp reference of each suite is computed once and shared (and so is each prompt's prefill when
    ``config.share_prefill``). The model should already be in the attention mode wanted (the command
    calls ``kvpack.enable(model)`` when ``config.fused``).

    Returns:
        An :class:`EvalRun` (environment and totals are filled by the caller).
    """
    import torch

    from .distortion import attention_distortion, capture_attention
    from .memory import kv_shape, memory_footprint
    from .perplexity import decode_reference, perplexity
    from .retrieval import make_samples, retrieval

    run = EvalRun(config=config)
    methods = config.methods
    quantized = [m for m in methods if not m.is_fp]

    if "memory" in config.suites:
        with _timed(run, "memory"):
            layers, heads, head_dim = kv_shape(model)
            for spec in methods:
                per_layer, skipped = spec.layer_settings(layers)
                run.memory[spec.label] = memory_footprint(
                    spec.config,
                    config.memory.lengths,
                    layers=layers,
                    kv_heads=heads,
                    head_dim=head_dim,
                    dtype=config.memory.dtype,
                    seed=config.seed,
                    layer_configs=per_layer,
                    skip_layers=skipped,
                    cycle=config.memory.cycle,
                )
                if not spec.is_fp:
                    run.memory_curve[spec.label] = memory_footprint(
                        spec.config, config.memory.curve, layers=layers, kv_heads=heads, head_dim=head_dim,
                        dtype=config.memory.curve_dtype, seed=config.seed, layer_configs=per_layer,
                        skip_layers=skipped,
                    )  # fmt: skip

    if "ppl" in config.suites:
        settings = config.ppl
        with _timed(run, "ppl"):
            text = corpus(settings.book, settings.text_file)
            reference = decode_reference(
                model,
                tokenizer,
                text,
                prefill=settings.prefill,
                tokens=settings.tokens,
                windows=settings.windows,
                batch_size=settings.batch_size,
                share_prefill=config.share_prefill,
                progress=progress,
            )
            for spec in methods:
                if spec.is_fp:
                    run.perplexity[spec.label] = reference.as_result(spec.label)
                    continue
                run.perplexity[spec.label] = perplexity(
                    model,
                    tokenizer,
                    text,
                    spec.cache_factory(),
                    reference=reference,
                    share_prefill=config.share_prefill,
                    label=spec.label,
                    progress=progress,
                )
            for result in run.perplexity.values():
                result.reference = None  # the fp log-probs and prefill tensors are large

    if "kld" in config.suites and quantized:
        settings = config.kld
        with _timed(run, "kld"):
            from .kld import kl_divergence

            run.kld = kl_divergence(model, tokenizer, corpus(settings.book, settings.text_file),
                                    {spec.label: spec.cache_factory() for spec in quantized}, chunk=settings.chunk,
                                    ubatch=settings.ubatch, chunks=settings.chunks, progress=progress)  # fmt: skip

    for suite in ("passkey", "niah"):
        if suite not in config.suites:
            continue
        settings = getattr(config, suite)
        with _timed(run, suite):
            samples = []
            for task in settings.tasks:
                samples += make_samples(
                    tokenizer, task, settings.lengths, settings.depths, settings.samples, seed=config.seed
                )
            outcomes = retrieval(
                model,
                tokenizer,
                samples,
                {spec.label: spec.cache_factory() for spec in methods},
                max_new_tokens=settings.max_new_tokens,
                batch_size=settings.batch_size,
                question_in_prefill=settings.question_in_prefill,
                share_prefill=config.share_prefill,
                progress=progress,
            )
            for label, rows in outcomes.items():
                run.retrieval.setdefault(label, []).extend(rows)

    if "distortion" in config.suites and quantized:
        settings = config.distortion
        with _timed(run, "distortion"):
            text = corpus(settings.book, settings.text_file)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: settings.context]
            if len(ids) < settings.context:
                source = settings.text_file or settings.book
                raise ValueError(f"{source} has {len(ids)} tokens, fewer than context {settings.context}")
            capture = capture_attention(model, torch.tensor([ids]), queries=settings.queries)
            run.distortion = attention_distortion(
                capture, {spec.label: spec.layer_config(len(capture.keys)) for spec in quantized}, progress=progress
            )
    return run
