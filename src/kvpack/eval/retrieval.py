"""Long-context retrieval, generated locally at token-exact lengths: passkey and RULER-style NIAH.

Tasks (prompts are built from token ids, so a sample of length L is exactly L prompt tokens):

* ``passkey`` (Mohtashami & Jaggi 2023, arXiv 2305.16300): the task line, the filler "The grass is green.
  ..." repeated, the line "The pass key is {n}. Remember it. {n} is the pass key." at the requested depth,
  then "What is the pass key? The pass key is". n has 5 digits. Deviation: the task line, filler and
  needle form one paragraph (the original puts them on separate lines); only the question starts a line.
* ``niah_single_1`` (RULER, Hsieh et al. 2024, arXiv 2404.06654): RULER's template around a haystack of the
  same filler repeated, one block per line, and one needle "One of the special magic numbers for {key} is:
  {value}." with a word-pair key and a 7-digit value.
* ``niah_multikey_2`` (RULER): the haystack is made of distractor needles only, each with another key and
  value; the needle for the queried key sits at the requested depth.

Depth is the needle's start as a fraction of the haystack; the needle goes to the block boundary nearest to
the requested depth (``RetrievalSample.needle_depth`` is the actual one). The haystack holds whole blocks
while they fit, then the first tokens of one filler block to make the length exact (for multikey_2 too,
so that no distractor number is cut short just before the question).

Scoring: greedy decoding, at most ``max_new_tokens`` tokens; the answer is the first integer in the output,
and a sample is correct when it equals the needle's value exactly. When the tokenizer writes the space
before a number as a token of its own (SmolLM2's does: " 68231" is " " + five digits), the question ends
with that token, so the first generated token is already the answer: otherwise greedy decoding's choice of
" " or " the" after "The pass key is", a near tie for SmolLM2-135M (0.29 vs 0.28 at 1k tokens), decides many
samples whatever the cache holds.

What goes through the compressed cache: by default only the context (instructions, haystack, needle) is
prefilled; the question is then appended through the cache as one chunk and the answer decoded, so the
question and every answer token attend to the quantized haystack, as when a cached document is asked about
later. ``question_in_prefill=True`` prefills the whole prompt instead (the first answer token is then
computed from exact prefill attention for every method).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._common import CacheFactory, cache_tensors, fill_cache, forward_last, fresh_cache, progress_bar

__all__ = [
    "RETRIEVAL_TASKS",
    "RetrievalOutcome",
    "RetrievalSample",
    "make_sample",
    "make_samples",
    "niah_sample",
    "parse_answer",
    "passkey_sample",
    "retrieval",
    "summarize",
]

logger = logging.getLogger(__name__)

RETRIEVAL_TASKS = ("passkey", "niah_single_1", "niah_multikey_2")

PASSKEY_TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

NIAH_HEADER = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = (
    "What is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is"
)

# RULER draws keys as random adjective-noun pairs (wonderwords); these short lists give 4,096 pairs.
_ADJECTIVES = (
    "abrupt",
    "ancient",
    "bitter",
    "bold",
    "brave",
    "bright",
    "calm",
    "careful",
    "cheerful",
    "clever",
    "cold",
    "crowded",
    "curious",
    "damp",
    "dark",
    "distant",
    "dusty",
    "eager",
    "early",
    "empty",
    "faint",
    "famous",
    "fierce",
    "fragile",
    "gentle",
    "giant",
    "golden",
    "grumpy",
    "hidden",
    "hollow",
    "humble",
    "icy",
    "jolly",
    "lazy",
    "little",
    "lively",
    "lonely",
    "loud",
    "lucky",
    "mellow",
    "misty",
    "modern",
    "narrow",
    "noisy",
    "odd",
    "pale",
    "polite",
    "proud",
    "quick",
    "quiet",
    "rapid",
    "rough",
    "rustic",
    "shiny",
    "silent",
    "silver",
    "sleepy",
    "smooth",
    "sour",
    "steep",
    "sturdy",
    "tender",
    "vivid",
    "wooden",
)
_NOUNS = (
    "anchor",
    "apple",
    "arrow",
    "badge",
    "barrel",
    "basket",
    "beacon",
    "blanket",
    "bottle",
    "bridge",
    "bucket",
    "button",
    "cabin",
    "candle",
    "canyon",
    "castle",
    "chair",
    "cloud",
    "comet",
    "compass",
    "cottage",
    "crayon",
    "crystal",
    "desert",
    "diamond",
    "dragon",
    "engine",
    "feather",
    "forest",
    "fountain",
    "garden",
    "glacier",
    "hammer",
    "harbor",
    "helmet",
    "island",
    "jacket",
    "kettle",
    "ladder",
    "lantern",
    "meadow",
    "mirror",
    "needle",
    "orchard",
    "pebble",
    "pencil",
    "piano",
    "planet",
    "pocket",
    "puzzle",
    "quilt",
    "rabbit",
    "ribbon",
    "river",
    "saddle",
    "shelter",
    "spoon",
    "statue",
    "tiger",
    "tunnel",
    "valley",
    "violin",
    "wagon",
    "window",
)

_INTEGER = re.compile(r"\d+")
_DONE = re.compile(r"\d+\D")


@dataclasses.dataclass(frozen=True)
class RetrievalSample:
    """One retrieval prompt, as token ids.

    Attributes:
        task: one of :data:`RETRIEVAL_TASKS`.
        length: prompt tokens, ``len(context_ids) + len(question_ids)``.
        depth: requested needle depth in [0, 1].
        needle_depth: actual depth: the needle's first haystack position / haystack tokens.
        needle_start, needle_end: token span of the needle in the prompt.
        context_ids: instructions, haystack and needle.
        question_ids: the question; generation continues after it.
        answer: the needle's value, digits only.
    """

    task: str
    length: int
    depth: float
    needle_depth: float
    needle_start: int
    needle_end: int
    context_ids: tuple[int, ...]
    question_ids: tuple[int, ...]
    answer: str

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.context_ids + self.question_ids


@dataclasses.dataclass(frozen=True)
class RetrievalOutcome:
    """A method's answer to one :class:`RetrievalSample`."""

    label: str
    task: str
    length: int
    depth: float
    needle_depth: float
    answer: str
    output: str
    prediction: str | None
    correct: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_answer(text: str) -> str | None:
    """The first integer (a run of digits) in ``text``, or None: ``" 68231. Remember"`` -> ``"68231"``."""
    match = _INTEGER.search(text)
    return match.group(0) if match else None


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_question(tokenizer, text: str) -> list[int]:
    """The question, plus the space before the answer when the tokenizer writes it as a token of its own."""
    ids = _encode(tokenizer, text)
    spaced = _encode(tokenizer, text + " ")
    if len(spaced) == len(ids) + 1 and spaced[:-1] == ids and tokenizer.decode(spaced[-1:]) == " ":
        return spaced
    return ids


def _assemble(
    header: list[int], units, needle: list[int], question: list[int], length: int, depth: float, pad: list[int]
) -> tuple[list[int], int, float]:
    """Header + haystack + question, exactly ``length`` tokens: whole ``units`` while they fit, then the start
    of ``pad`` for the remaining tokens; the needle goes to the unit boundary nearest ``depth``.

    Returns:
        (prompt ids, needle start, actual depth).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    budget = length - len(header) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"length {length} is shorter than the prompt without any haystack ({length - budget} tokens)")
    haystack: list[int] = []
    boundaries = [0]
    for unit in units:
        if len(haystack) + len(unit) > budget:
            break
        haystack.extend(unit)
        boundaries.append(len(haystack))
    remaining = budget - len(haystack)
    haystack.extend((pad * (remaining // max(len(pad), 1) + 1))[:remaining])
    boundaries.append(budget)
    cut = min(boundaries, key=lambda b: (abs(b - depth * budget), b))
    ids = header + haystack[:cut] + needle + haystack[cut:] + question
    return ids, len(header) + cut, (cut / budget if budget else 0.0)


def _repeat(unit: list[int]):
    while True:
        yield unit


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _rng(*parts) -> random.Random:
    # Seeding with a str is deterministic across processes (random hashes it with sha512).
    return random.Random(":".join(str(p) for p in parts))


def _sample(task, length, depth, header, units, needle, question, answer, pad) -> RetrievalSample:
    ids, start, actual = _assemble(header, units, needle, question, length, depth, pad)
    split = len(ids) - len(question)
    return RetrievalSample(
        task=task,
        length=length,
        depth=depth,
        needle_depth=actual,
        needle_start=start,
        needle_end=start + len(needle),
        context_ids=tuple(ids[:split]),
        question_ids=tuple(ids[split:]),
        answer=answer,
    )


def passkey_sample(tokenizer, length: int, depth: float, seed: int = 0, index: int = 0) -> RetrievalSample:
    """A passkey prompt of exactly ``length`` tokens with the key at ``depth`` (0 = first, 1 = last).

    The 5-digit key is a function of ``(length, depth, seed, index)``.

    Raises:
        ValueError: ``depth`` outside [0, 1], or ``length`` too short for the fixed text.
    """
    value = str(_rng("passkey", length, depth, seed, index).randint(10000, 99999))
    filler = _encode(tokenizer, " " + FILLER)
    return _sample(
        "passkey",
        length,
        depth,
        header=_encode(tokenizer, PASSKEY_TASK),
        units=_repeat(filler),
        pad=filler,
        needle=_encode(tokenizer, " " + PASSKEY_NEEDLE.format(value=value)),
        question=_encode_question(tokenizer, "\n" + PASSKEY_QUESTION),
        answer=value,
    )


def niah_sample(tokenizer, task: str, length: int, depth: float, seed: int = 0, index: int = 0) -> RetrievalSample:
    """A RULER ``niah_single_1`` or ``niah_multikey_2`` prompt of exactly ``length`` tokens.

    The key depends on ``(task, length, seed, index)`` only, so the samples of one length share a question
    and batch together; the value and the distractors also depend on ``depth``.

    Raises:
        ValueError: unknown ``task``, ``depth`` outside [0, 1], or ``length`` too short.
    """
    if task not in ("niah_single_1", "niah_multikey_2"):
        raise ValueError(f"task must be one of ('niah_single_1', 'niah_multikey_2'), got {task!r}")
    key = _key(_rng(task, "key", length, seed, index))
    rng = _rng(task, length, depth, seed, index)
    value = str(rng.randint(1_000_000, 9_999_999))
    filler = _encode(tokenizer, "\n" + FILLER)
    if task == "niah_single_1":
        units = _repeat(filler)
    else:

        def distractors():
            while True:
                other = _key(rng)
                if other != key:
                    text = NIAH_NEEDLE.format(key=other, value=rng.randint(1_000_000, 9_999_999))
                    yield _encode(tokenizer, "\n" + text)

        units = distractors()
    return _sample(
        task,
        length,
        depth,
        header=_encode(tokenizer, NIAH_HEADER),
        units=units,
        pad=filler,
        needle=_encode(tokenizer, "\n" + NIAH_NEEDLE.format(key=key, value=value)),
        question=_encode_question(tokenizer, "\n" + NIAH_QUESTION.format(key=key)),
        answer=value,
    )


def make_sample(tokenizer, task: str, length: int, depth: float, seed: int = 0, index: int = 0) -> RetrievalSample:
    """:func:`passkey_sample` or :func:`niah_sample` by task name (one of :data:`RETRIEVAL_TASKS`)."""
    if task == "passkey":
        return passkey_sample(tokenizer, length, depth, seed, index)
    if task in RETRIEVAL_TASKS:
        return niah_sample(tokenizer, task, length, depth, seed, index)
    raise ValueError(f"task must be one of {RETRIEVAL_TASKS}, got {task!r}")


def make_samples(
    tokenizer, task: str, lengths: Sequence[int], depths: Sequence[float], samples: int = 1, seed: int = 0
) -> list[RetrievalSample]:
    """The sweep ``lengths`` x ``depths`` x ``samples`` of one task."""
    return [
        make_sample(tokenizer, task, length, depth, seed, index)
        for length in lengths
        for depth in depths
        for index in range(samples)
    ]


def _finished(text: str) -> bool:
    return bool(_DONE.search(text))


@torch.no_grad()
def _generate(model, tokenizer, cache, logits: torch.Tensor, max_new_tokens: int) -> list[str]:
    """Greedy continuation from ``logits`` (b, V); stops when every row has a complete integer."""
    eos = getattr(tokenizer, "eos_token_id", None)
    rows = logits.shape[0]
    tokens: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for step in range(max_new_tokens):
        next_ids = logits.argmax(-1)  # (b,)
        for row, token in enumerate(next_ids.tolist()):
            if not done[row]:
                tokens[row].append(token)
                done[row] = token == eos or _finished(tokenizer.decode(tokens[row]))
        if all(done) or step == max_new_tokens - 1:
            break
        _, logits = forward_last(model, next_ids[:, None], cache)
    return [tokenizer.decode(row) for row in tokens]


def _batches(samples: Sequence[RetrievalSample], batch_size: int) -> list[list[int]]:
    """Indices of samples that can run together: same context and question lengths."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault((len(sample.context_ids), len(sample.question_ids)), []).append(i)
    out = []
    for members in groups.values():
        out += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    return out


@torch.no_grad()
def retrieval(
    model,
    tokenizer,
    samples: Sequence[RetrievalSample],
    methods: Mapping[str, CacheFactory | None],
    *,
    max_new_tokens: int = 12,
    batch_size: int = 4,
    question_in_prefill: bool = False,
    share_prefill: bool = True,
    progress: bool = False,
) -> dict[str, list[RetrievalOutcome]]:
    """Answer every sample with every method.

    Args:
        model, tokenizer: a transformers causal LM and its tokenizer.
        samples: from :func:`make_samples`.
        methods: label -> cache factory (``None``: the fp ``DynamicCache``).
        max_new_tokens: greedy decoding budget per answer.
        batch_size: samples of equal shape run together (one prefill, one decode loop per method).
        question_in_prefill: prefill the question with the context (see the module docstring).
        share_prefill: run the (exact) prefill once in fp and copy it into each method's cache.
        progress: show a tqdm bar on stderr.

    Returns:
        label -> outcomes, in the order of ``samples``.
    """
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max((s.length for s in samples), default=0) + max_new_tokens
    if max_positions and longest > max_positions:
        logger.warning("prompts plus answers reach %d positions, beyond the model's %d", longest, max_positions)
    outcomes: dict[str, list[RetrievalOutcome | None]] = {label: [None] * len(samples) for label in methods}
    groups = _batches(samples, max(1, batch_size))
    with progress_bar(len(groups) * len(methods), "retrieval", progress) as bar:
        for members in groups:
            batch = [samples[i] for i in members]
            context = torch.tensor([s.context_ids for s in batch], dtype=torch.long)  # (b, T_c)
            question = torch.tensor([s.question_ids for s in batch], dtype=torch.long)  # (b, T_q)
            prompt = torch.cat([context, question], dim=1) if question_in_prefill else context
            shared = first_logits = fp_cache_type = None
            if share_prefill:
                fp_cache, first_logits = forward_last(model, prompt)
                fp_cache_type = type(fp_cache)
                shared = cache_tensors(fp_cache, prompt.shape[1])
                del fp_cache
            bar.set_postfix_str(f"{batch[0].task} {batch[0].length}")
            for label, factory in methods.items():
                if shared is not None:
                    cache = fresh_cache(model, factory, fp_cache_type)
                    fill_cache(cache, shared)
                    logits = first_logits
                else:
                    cache = factory(model) if factory is not None else None
                    cache, logits = forward_last(model, prompt, cache)
                if not question_in_prefill:
                    _, logits = forward_last(model, question, cache)
                texts = _generate(model, tokenizer, cache, logits, max_new_tokens)
                for i, sample, text in zip(members, batch, texts):
                    prediction = parse_answer(text)
                    outcomes[label][i] = RetrievalOutcome(
                        label=label,
                        task=sample.task,
                        length=sample.length,
                        depth=sample.depth,
                        needle_depth=sample.needle_depth,
                        answer=sample.answer,
                        output=text,
                        prediction=prediction,
                        correct=prediction == sample.answer,
                    )
                del cache
                bar.update()
    return {label: list(rows) for label, rows in outcomes.items()}


def summarize(outcomes: Sequence[RetrievalOutcome]) -> dict[str, dict[int, float]]:
    """Accuracy per task and length: ``{task: {length: accuracy}}``."""
    table: dict[str, dict[int, list[bool]]] = {}
    for outcome in outcomes:
        table.setdefault(outcome.task, {}).setdefault(outcome.length, []).append(outcome.correct)
    return {
        task: {length: sum(hits) / len(hits) for length, hits in sorted(by_length.items())}
        for task, by_length in table.items()
    }
