"""kvpack.eval on a tiny random Llama with a byte-level tokenizer: exactness against fp, prompt construction,
scoring, and the report files. The embedded model is not needed."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

import kvpack
import kvpack.data
from kvpack import eval as kv_eval
from kvpack.eval.retrieval import FILLER, NIAH_HEADER, PASSKEY_TASK

from conftest import make_tiny_llama

transformers = pytest.importorskip("transformers")

HEAD_DIM = 32
RESIDUAL = 32  # small, so that a few hundred tokens exercise the quantized path


class ByteTokenizer:
    """Bytes as tokens (vocab 256): enough of the tokenizer API that kvpack.eval uses."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def make_model(seed: int = 0):
    """conftest's tiny Llama with a byte vocabulary, head_dim 32 and room for 4096 positions."""
    return make_tiny_llama(seed, vocab_size=256, head_dim=HEAD_DIM, max_position_embeddings=4096)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: the tiny model gains nothing from more, and on a busy machine OpenMP's waiting
    makes its many small ops an order of magnitude slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model():
    """A fresh tiny random LlamaForCausalLM: 2 layers, 4 query / 2 kv heads, head_dim 32, byte vocabulary."""
    return make_model()


@pytest.fixture
def tokenizer():
    return ByteTokenizer()


TEXT = " ".join(f"word{i % 37} thing{(i * 7) % 11}." for i in range(200))


def small_configs() -> list[tuple[str, kvpack.MethodConfig]]:
    """Every registered method at its defaults, with a short residual so that it quantizes."""
    out = []
    for name in kvpack.method_names():
        out.append((name, kvpack.config_class(name)(residual_length=RESIDUAL)))
    return out


def covering(name: str) -> kvpack.MethodConfig:
    """A config of method ``name`` whose fp residual holds every token of these tests."""
    return kvpack.config_class(name)(residual_length=2048)


def factory(config):
    return lambda m: kvpack.make_cache(m, config)


# --- perplexity -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(_one_thread):
    """The fp run of :func:`make_model` (every ``model`` fixture has the same weights)."""
    return kv_eval.decode_reference(make_model(), ByteTokenizer(), TEXT, prefill=96, tokens=12, windows=3, batch_size=2)


def test_fp_method_gives_zero_kl_and_full_agreement(model, tokenizer, reference):
    result = kv_eval.perplexity(model, tokenizer, TEXT, lambda m: None, reference=reference)
    assert result.kl == 0.0
    assert result.top1 == 1.0
    assert result.ppl == result.fp_ppl == reference.ppl
    assert len(result.per_window_ppl) == 3
    direct = kv_eval.perplexity(model, tokenizer, TEXT, None, prefill=96, tokens=12, windows=3)
    assert direct.kl == 0.0 and direct.top1 == 1.0 and direct.ppl == pytest.approx(reference.ppl, rel=1e-6)


def test_reference_matches_a_full_forward(model, tokenizer, reference):
    # Teacher-forced decoding with a DynamicCache scores the same tokens a single forward pass does.
    ids = reference.input_ids  # (W, C + N + 1)
    logits = model(ids[:, :-1]).logits[:, reference.prefill :].float()  # (W, N, V)
    expected = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(reference.log_probs, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", kvpack.method_names())
@pytest.mark.parametrize("fused", [False, True])
def test_residual_covering_the_context_gives_the_fp_numbers(model, tokenizer, reference, name, fused):
    if fused:
        kvpack.enable(model)
    result = kv_eval.perplexity(model, tokenizer, TEXT, factory(covering(name)), reference=reference)
    if fused:  # the fused kernel computes the same attention in another order
        assert result.kl == pytest.approx(0.0, abs=1e-6)
        assert result.ppl == pytest.approx(reference.ppl, rel=1e-5)
    else:
        assert result.kl == 0.0
        assert result.ppl == reference.ppl
    assert result.top1 == 1.0


@pytest.mark.parametrize("name,config", small_configs())
def test_shared_prefill_equals_each_methods_own_prefill(model, tokenizer, reference, name, config):
    # Compat path: a prefill through the compressed cache feeds every layer the fp keys/values exactly.
    shared = kv_eval.perplexity(model, tokenizer, TEXT, factory(config), reference=reference)
    own = kv_eval.perplexity(model, tokenizer, TEXT, factory(config), reference=reference, share_prefill=False)
    assert shared.kl > 0  # the residual is short: this does test the quantized path
    assert (shared.ppl, shared.kl, shared.top1) == (own.ppl, own.kl, own.top1)


def test_shared_prefill_fused(model, tokenizer, reference):
    kvpack.enable(model)
    config = kvpack.KIVIConfig(key_bits=4, value_bits=4, residual_length=RESIDUAL)
    shared = kv_eval.perplexity(model, tokenizer, TEXT, factory(config), reference=reference)
    own = kv_eval.perplexity(model, tokenizer, TEXT, factory(config), reference=reference, share_prefill=False)
    assert shared.ppl == pytest.approx(own.ppl, rel=1e-3)
    assert shared.kl == pytest.approx(own.kl, rel=0.05, abs=1e-5)


def test_perplexity_rejects_a_reference_of_another_text(model, tokenizer, reference):
    with pytest.raises(ValueError, match="another text"):
        kv_eval.perplexity(model, tokenizer, TEXT + " more", None, reference=reference)


def test_window_offsets():
    from kvpack.eval.perplexity import window_offsets

    assert window_offsets(100, 10, 1) == [0]
    assert window_offsets(100, 10, 3) == [0, 45, 90]
    with pytest.raises(ValueError, match="fewer than one window"):
        window_offsets(5, 10, 1)


# --- retrieval ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("length", [600, 2000])
def test_passkey_puts_the_key_at_the_requested_depth(tokenizer, length, depth):
    sample = kv_eval.passkey_sample(tokenizer, length, depth, seed=3)
    assert len(sample.prompt_ids) == sample.length == length
    needle = tokenizer.decode(sample.prompt_ids[sample.needle_start : sample.needle_end])
    assert needle == f" The pass key is {sample.answer}. Remember it. {sample.answer} is the pass key."
    assert len(sample.answer) == 5
    header = len(tokenizer(PASSKEY_TASK)["input_ids"])
    haystack = length - header - (sample.needle_end - sample.needle_start) - len(sample.question_ids)
    unit = len(tokenizer(" " + FILLER)["input_ids"])
    position = sample.needle_start - header  # needle start within the haystack
    assert position / haystack == pytest.approx(sample.needle_depth)
    assert abs(position - depth * haystack) <= unit / 2 + 1  # nearest block boundary
    text = tokenizer.decode(sample.prompt_ids)
    assert text.startswith(PASSKEY_TASK)
    assert text.endswith("\nWhat is the pass key? The pass key is ")  # the byte tokenizer's space is a token
    assert text.count(sample.answer) == 2


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_2"])
def test_niah_prompts(tokenizer, task):
    samples = kv_eval.make_samples(tokenizer, task, [700, 1500], [0.25, 0.75], seed=1)
    for sample in samples:
        assert len(sample.prompt_ids) == sample.length
        text = tokenizer.decode(sample.prompt_ids)
        key = text.rsplit("magic number for ", 1)[1].split(" ")[0]
        needle = tokenizer.decode(sample.prompt_ids[sample.needle_start : sample.needle_end])
        assert needle == f"\nOne of the special magic numbers for {key} is: {sample.answer}."
        assert text.startswith(NIAH_HEADER)
        assert text.count(f"for {key} is:") == 1  # distractors never use the queried key
        assert abs(sample.needle_depth - sample.depth) < 0.1
        if task == "niah_multikey_2":
            assert text.count("special magic numbers for") >= 5  # the haystack is distractor needles
            assert "The grass is green" not in text.split("\n")[1]
        else:
            assert "The grass is green. The sky is blue." in text
    # one key per length: the samples of a length batch together
    by_length = {}
    for sample in samples:
        by_length.setdefault(sample.length, set()).add(sample.question_ids)
    assert all(len(questions) == 1 for questions in by_length.values())


def test_samples_are_deterministic(tokenizer):
    first = kv_eval.make_samples(tokenizer, "niah_multikey_2", [800], [0.5], samples=2, seed=7)
    again = kv_eval.make_samples(tokenizer, "niah_multikey_2", [800], [0.5], samples=2, seed=7)
    assert first == again
    assert first[0].answer != first[1].answer


def test_too_short_lengths_and_bad_depths_raise(tokenizer):
    with pytest.raises(ValueError, match="shorter than the prompt"):
        kv_eval.passkey_sample(tokenizer, 50, 0.5)
    with pytest.raises(ValueError, match="depth must be in"):
        kv_eval.passkey_sample(tokenizer, 600, 1.5)
    with pytest.raises(ValueError, match="task must be one of"):
        kv_eval.make_sample(tokenizer, "niah_multivalue", 600, 0.5)


@pytest.mark.parametrize(
    "text,expected",
    [
        (" 68231. Remember it.", "68231"),
        ("The pass key is 123", "123"),
        (": 1234567.\nWhat", "1234567"),
        ("-42 and 7", "42"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_parse_answer(text, expected):
    assert kv_eval.parse_answer(text) == expected


def test_retrieval_runs_every_method_and_scores(model, tokenizer):
    samples = kv_eval.make_samples(tokenizer, "passkey", [400, 600], [0.2, 0.8]) + kv_eval.make_samples(
        tokenizer, "niah_single_1", [500], [0.5]
    )
    methods = {
        "fp": None,
        "covering": factory(covering("kivi")),
        "KIVI-2": factory(kvpack.KIVIConfig(residual_length=RESIDUAL)),
    }
    outcomes = kv_eval.retrieval(model, tokenizer, samples, methods, max_new_tokens=6, batch_size=2)
    assert list(outcomes) == list(methods)
    for label, rows in outcomes.items():
        assert [(o.task, o.length, o.depth) for o in rows] == [(s.task, s.length, s.depth) for s in samples]
        for outcome, sample in zip(rows, samples):
            assert outcome.label == label and outcome.answer == sample.answer
            assert outcome.prediction == kv_eval.parse_answer(outcome.output)
            assert outcome.correct == (outcome.prediction == sample.answer)
    assert [o.output for o in outcomes["covering"]] == [o.output for o in outcomes["fp"]]
    own = kv_eval.retrieval(
        model, tokenizer, samples, {"KIVI-2": methods["KIVI-2"]}, max_new_tokens=6, share_prefill=False
    )
    assert [o.output for o in own["KIVI-2"]] == [o.output for o in outcomes["KIVI-2"]]
    summary = kv_eval.summarize(outcomes["fp"])
    assert set(summary) == {"passkey", "niah_single_1"} and set(summary["passkey"]) == {400, 600}


def test_retrieval_scores_a_model_that_answers(tokenizer):
    """A fake model that always continues with the needle's digits is scored correct."""
    sample = kv_eval.passkey_sample(tokenizer, 300, 0.5)
    digits = list(f" {sample.answer}.".encode())

    class Echo(torch.nn.Module):
        """Ignores its input: after the context prefill, each call predicts the next character of the answer."""

        def __init__(self):
            super().__init__()
            self.config = make_model().config
            self.calls = 0

        def forward(self, input_ids, cache=None, **kwargs):
            logits = torch.zeros(input_ids.shape[0], 1, 256)
            if self.calls:
                logits[:, :, digits[min(self.calls - 1, len(digits) - 1)]] = 1.0
            self.calls += 1
            return transformers.modeling_outputs.CausalLMOutputWithPast(logits=logits, cache=cache)

    outcomes = kv_eval.retrieval(Echo(), tokenizer, [sample], {"echo": None}, share_prefill=False)
    assert outcomes["echo"][0].output == f" {sample.answer}."
    assert outcomes["echo"][0].correct


# --- distortion ------------------------------------------------------------------------------------------


def test_capture_reproduces_the_models_attention_weights(tokenizer):
    model = make_model()
    model.set_attn_implementation("eager")
    ids = torch.tensor([tokenizer(TEXT)["input_ids"][:160]])
    capture = kv_eval.capture_attention(model, ids, queries=8)
    weights = model(ids, output_attentions=True).attentions  # per layer (1, H_q, T, T)
    for layer, expected in enumerate(weights):
        query, keys = capture.queries[layer], capture.keys[layer]
        scores = query @ keys.repeat_interleave(2, dim=1).transpose(-1, -2) * capture.scales[layer]
        causal = torch.ones(8, 160, dtype=torch.bool).tril(160 - 8)
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        torch.testing.assert_close(probs, expected[:, :, -8:], atol=1e-5, rtol=1e-4)


def test_distortion_is_zero_for_a_covering_residual_and_positive_when_quantized(model, tokenizer):
    ids = torch.tensor([tokenizer(TEXT)["input_ids"][:200]])
    capture = kv_eval.capture_attention(model, ids, queries=6)
    results = kv_eval.attention_distortion(
        capture, {"covering": covering("kivi"), "KIVI-2": kvpack.KIVIConfig(residual_length=RESIDUAL)}
    )
    assert len(results["covering"].per_layer) == 2
    assert results["covering"].max < 1e-5
    assert results["KIVI-2"].mean > 1e-3
    assert results["KIVI-2"].to_dict()["mean"] == results["KIVI-2"].mean


def test_distortion_of_a_model_with_sliding_layers_measures_its_full_attention_layers():
    """Qwen2 with layer 1 sliding (window 16 < 60 tokens): its cache holds 15 positions, so only layer 0 is
    captured and scored, and the report names the measured layers."""
    import transformers

    config = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      layer_types=["full_attention", "sliding_attention"], sliding_window=16,
                                      use_sliding_window=True)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    capture = kv_eval.capture_attention(model, torch.randint(0, 128, (1, 60)), queries=4)
    assert capture.layers == [0] and len(capture.keys) == 1 and capture.num_tokens == 60
    results = kv_eval.attention_distortion(capture, {"KIVI-2": kvpack.KIVIConfig(group_size=16, residual_length=16)})
    assert results["KIVI-2"].layers == [0] and results["KIVI-2"].worst_layer == 0 and results["KIVI-2"].mean > 0


def test_capture_rejects_bad_query_counts(model):
    with pytest.raises(ValueError, match="queries must be in"):
        kv_eval.capture_attention(model, torch.zeros(1, 10, dtype=torch.long), queries=11)


# --- memory -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,config", small_configs())
def test_memory_counts_every_layer_with_all_heads(name, config):
    lengths = [256, 96]
    rows = kv_eval.memory_footprint(config, lengths, layers=3, kv_heads=2, head_dim=HEAD_DIM, dtype="float16")
    assert [r.tokens for r in rows] == lengths
    for row in rows:
        expected = 0
        for layer_idx in range(3):
            layer = kvpack.make_layer(config, layer_idx=layer_idx)
            layer.append(torch.randn(1, 2, row.tokens, HEAD_DIM).half(), torch.randn(1, 2, row.tokens, HEAD_DIM).half())
            expected += layer.nbytes()
        assert row.nbytes == expected
        assert row.fp16_nbytes == 3 * 2 * 2 * row.tokens * HEAD_DIM * 2
        assert row.bits_per_element == pytest.approx(16 * row.nbytes / row.fp16_nbytes)
        assert row.compression == pytest.approx(row.fp16_nbytes / row.nbytes)
        assert row.bytes_per_token == pytest.approx(row.nbytes / row.tokens)


def test_memory_of_fp_is_16_bits():
    (row,) = kv_eval.memory_footprint(None, [1000], layers=30, kv_heads=3, head_dim=64)
    assert row.bits_per_element == 16.0 and row.compression == 1.0 and row.bytes_per_token == 23040


def test_kv_shape(model):
    assert kv_eval.kv_shape(model) == (2, 2, HEAD_DIM)


# --- config layering, matrix and report -----------------------------------------------------------------


def test_default_matrix_has_every_registered_method():
    specs = kv_eval.default_methods()
    labels = [s.label for s in specs]
    assert labels[:5] == ["fp", "KIVI-4", "KIVI-2", "QJL-128", "QJL-256"]
    methods = {s.config.method for s in specs if s.config is not None}
    assert methods == set(kvpack.method_names())
    assert specs[3].config.sketch_dim == 2 * 64 and specs[4].config.sketch_dim == 4 * 64
    variants = [s for s in specs if s.preset is None]
    assert variants[-1].label == "turbo-K4V2" and (variants[-1].config.key_bits, variants[-1].config.value_bits) == (
        4,
        2,
    )
    assert [s.label for s in specs if s.preset] == list(kvpack.presets.names())  # the presets close the matrix
    assert len(set(labels)) == len(labels)


def test_config_layering(tmp_path):
    from kvpack.cli import build_parser
    from kvpack.commands.eval import resolve_config

    path = tmp_path / "eval.yaml"
    path.write_text(
        "suites: [ppl, memory]\n"
        "methods: [fp, KIVI-2, {label: K4-R64, method: kivi, key_bits: 4, value_bits: 4, residual_length: 64}]\n"
        "ppl: {prefill: 100, tokens: 20}\n"
    )
    args = build_parser().parse_args(["eval", "--config", str(path), "--tokens", "30", "--lengths", "512,1024"])
    config = resolve_config(args)
    assert config.suites == ("ppl", "memory")
    assert [m.label for m in config.methods] == ["fp", "KIVI-2", "K4-R64"]
    assert config.methods[2].config == kvpack.KIVIConfig(key_bits=4, value_bits=4, residual_length=64)
    assert (config.ppl.prefill, config.ppl.tokens, config.ppl.windows) == (100, 30, kv_eval.FULL.ppl.windows)
    assert config.passkey.lengths == config.niah.lengths == (512, 1024)
    quick = resolve_config(build_parser().parse_args(["eval", "--quick", "--config", str(path)]))
    assert quick.ppl.prefill == 100 and quick.passkey == kv_eval.QUICK.passkey
    assert kv_eval.EvalConfig().merged(config.to_dict()) == config  # to_dict round-trips


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"ppl": {"prefil": 10}}, "unknown ppl settings"),
        ({"suite": ["ppl"]}, "unknown eval settings"),
        ({"suites": ["ppl", "bleu"]}, "suites must be"),
        ({"methods": ["KIVI-3"]}, "method label must be one of"),
        ({"methods": [{"method": "kivi", "key_bits": 3}]}, "key_bits must be one of"),
        ({"passkey": {"depths": [1.5]}}, "depths must be"),
        ({"niah": {"tasks": ["niah_multivalue"]}}, "tasks must be"),
        ({"methods": ["fp", "fp"]}, "labels must be unique"),
    ],
)
def test_bad_settings_raise(changes, match):
    with pytest.raises(ValueError, match=match):
        kv_eval.FULL.merged(changes)


def test_example_configs_parse_and_the_full_one_is_the_default():
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "configs"
    paths = sorted(folder.glob("*.yaml"))
    assert paths
    for path in paths:
        kv_eval.FULL.merged(yaml.safe_load(path.read_text()))
    assert kv_eval.EvalConfig().merged(yaml.safe_load((folder / "eval-full.yaml").read_text())) == kv_eval.FULL


def test_fp_is_always_in_the_matrix():
    config = kv_eval.FULL.merged({"methods": ["KIVI-2"]})
    assert [m.label for m in config.methods] == ["fp", "KIVI-2"]


def test_run_matrix_writes_every_report_file(model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(kvpack.data, "austen_text", lambda book="prideprejudice": TEXT)
    config = kv_eval.EvalConfig(
        methods=(
            kv_eval.MethodSpec("fp"),
            kv_eval.MethodSpec("KIVI-2", kvpack.KIVIConfig(residual_length=RESIDUAL)),
            kv_eval.MethodSpec("KIVI-4", kvpack.KIVIConfig(key_bits=4, value_bits=4, residual_length=RESIDUAL)),
        ),
        ppl=kv_eval.PerplexitySettings(prefill=64, tokens=8, windows=2),
        passkey=kv_eval.RetrievalSettings(lengths=(300, 500), depths=(0.5,), max_new_tokens=4, samples=1),
        niah=kv_eval.RetrievalSettings(
            tasks=("niah_single_1", "niah_multikey_2"), lengths=(400,), depths=(0.5,), max_new_tokens=4, samples=1
        ),
        distortion=kv_eval.DistortionSettings(context=128, queries=4),
        kld=kv_eval.KLDSettings(chunk=256, ubatch=64, chunks=2),
        memory=kv_eval.MemorySettings(lengths=(256, 512), curve=(8, 16, 64, 256)),
    )
    run = kv_eval.run_matrix(model, tokenizer, config)
    run.environment = kv_eval.environment()
    files = kv_eval.write_report(run, tmp_path / "out")
    expected = {
        "results.md",
        "results.csv",
        "retrieval.csv",
        "results.json",
        "quality_vs_bits.png",
        "passkey_vs_length.png",
        "niah_vs_length.png",
        "distortion_per_layer.png",
        "memory_vs_length.png",
    }
    assert set(files) == expected
    assert {p.name for p in (tmp_path / "out").iterdir()} == expected

    markdown = files["results.md"].read_text()
    assert "| method | bits/elem @512 | x fp16 @512 | ppl | KL to fp |" in markdown
    for label in ("fp", "KIVI-2", "KIVI-4"):
        assert f"| {label} |" in markdown

    with open(files["results.csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["fp", "KIVI-2", "KIVI-4"]
    assert float(rows[0]["kl"]) == 0.0 and float(rows[0]["bits"]) == 16.0
    assert float(rows[1]["kl"]) > 0 and float(rows[1]["bits"]) < float(rows[2]["bits"]) < 16
    with open(files["retrieval.csv"]) as f:
        assert len(list(csv.DictReader(f))) == 3 * (2 + 2)  # methods x (passkey + NIAH samples)

    data = json.loads(files["results.json"].read_text())
    assert set(data) == {
        "config",
        "environment",
        "seconds",
        "cpu_seconds",
        "perplexity",
        "retrieval",
        "distortion",
        "kld",
        "memory",
        "memory_curve",
    }
    suites = {"memory", "ppl", "kld", "passkey", "niah", "distortion"}
    assert set(data["cpu_seconds"]) == set(data["seconds"]) == suites
    assert set(data["kld"]) == {"KIVI-2", "KIVI-4"} and data["kld"]["KIVI-2"]["chunks"] == 2
    assert "## llama.cpp's KL-divergence protocol" in markdown and "smaller than float32 from" in markdown
    curve = data["memory_curve"]["KIVI-2"]
    assert [r["tokens"] for r in curve] == [8, 16, 64, 256]
    assert curve[0]["nbytes"] == 2 * 2 * 2 * 8 * HEAD_DIM * 4  # 8 tokens: all in the float32 residual
    assert data["config"]["ppl"]["prefill"] == 64
    assert data["environment"]["torch"] == torch.__version__ and data["environment"]["cores"] >= 1
    assert data["perplexity"]["fp"]["kl"] == 0.0
    assert set(data["distortion"]) == {"KIVI-2", "KIVI-4"}

    for name in expected:
        if name.endswith(".png"):
            content = files[name].read_bytes()
            assert content[:8] == b"\x89PNG\r\n\x1a\n" and len(content) > 1000


def test_importing_kvpack_eval_does_not_import_transformers():
    code = "import sys, kvpack.eval, kvpack.commands.eval; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_text_flag_reads_a_users_utf8_file_for_perplexity_and_distortion(tmp_path):
    from kvpack.cli import build_parser
    from kvpack.commands.eval import resolve_config
    from kvpack.eval.matrix import corpus

    path = tmp_path / "mine.txt"
    path.write_text("Il était une fois — naïve café. " * 50, encoding="utf-8")
    config = resolve_config(build_parser().parse_args(["eval", "--quick", "--text", str(path)]))
    assert config.ppl.text_file == config.distortion.text_file == str(path)
    assert corpus(config.ppl.book, config.ppl.text_file) == path.read_text(encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 text"):
        corpus("prideprejudice", str(tmp_path / "latin1.txt"))
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="holds no text"):
        corpus("prideprejudice", str(tmp_path / "blank.txt"))
    with pytest.raises(ValueError, match="cannot be read"):
        corpus("prideprejudice", str(tmp_path / "absent.txt"))
    with pytest.raises(SystemExit, match="alternatives"):
        resolve_config(build_parser().parse_args(["eval", "--text", str(path), "--book", "emma"]))


# --- llama.cpp's KL-divergence protocol ------------------------------------------------------------------
def test_kld_protocol_is_zero_for_a_covering_residual_and_positive_when_quantized(model, tokenizer):
    """Chunks fed in micro-batches: a cache whose residual holds every token gives the fp logits (KL ~ 0, same
    top token everywhere); a quantized one a positive KL, averaged over the chunks' second halves."""
    methods = {"covering": factory(covering("kivi")), "kivi": factory(kvpack.KIVIConfig(residual_length=RESIDUAL)),
               "turbo": factory(kvpack.TurboConfig(residual_length=RESIDUAL))}  # fmt: skip
    results = kv_eval.kl_divergence(model, tokenizer, TEXT, methods, chunk=256, ubatch=64, chunks=3)
    assert results["covering"].kl < 1e-6 and results["covering"].top1 == 1.0
    for name in ("kivi", "turbo"):
        r = results[name]
        assert r.kl > 1e-6 and len(r.per_chunk_kl) == 3 and r.kl == pytest.approx(sum(r.per_chunk_kl) / 3)
        assert 0 < r.top1 <= 1 and r.ppl > 1 and r.fp_ppl == results["covering"].fp_ppl
    assert results["covering"].ppl == pytest.approx(results["covering"].fp_ppl, rel=1e-5)
    with pytest.raises(ValueError, match="fewer than 99 chunks"):
        kv_eval.kl_divergence(model, tokenizer, TEXT, methods, chunk=256, ubatch=64, chunks=99)
    with pytest.raises(ValueError, match="ubatch"):
        kv_eval.kl_divergence(model, tokenizer, TEXT, methods, chunk=64, ubatch=128)


def test_memory_over_a_flush_cycle_is_the_mean_of_its_phases():
    """A single length catches the key residual at one phase; the cycle mean does not depend on the phase, so
    a row with sinks (shifted by S tokens) compares with one without at equal footing."""
    config = kvpack.TurboConfig(key_bits=4)
    phases = kv_eval.memory_footprint(config, [2048 + 16 * k for k in range(8)], layers=2, kv_heads=2, head_dim=64)
    (row,) = kv_eval.memory_footprint(config, [2048], layers=2, kv_heads=2, head_dim=64, cycle=8)
    assert row.bits_per_element == pytest.approx(sum(r.bits_per_element for r in phases) / 8)
    (sinks,) = kv_eval.memory_footprint(config.replace(sink_tokens=1), [2048], layers=2, kv_heads=2, head_dim=64,
                                        cycle=8)  # fmt: skip
    (single,) = kv_eval.memory_footprint(config.replace(sink_tokens=1), [2048], layers=2, kv_heads=2, head_dim=64)
    assert (
        abs(sinks.bits_per_element - row.bits_per_element) < 0.05 < single.bits_per_element - phases[0].bits_per_element
    )


def test_break_even_is_the_first_context_below_the_fp_cache():
    from kvpack.eval.report import break_even

    rows = kv_eval.memory_footprint(kvpack.KIVIConfig(residual_length=32), [16, 32, 64, 256], layers=2, kv_heads=2,
                                    head_dim=HEAD_DIM, dtype="float32")  # fmt: skip
    assert rows[0].nbytes == 2 * rows[0].fp16_nbytes  # all fp32: twice an fp16 cache
    assert break_even(rows, 4) == 32 and break_even(rows, 2) == 64  # the keys flush at R = 32, values stay fp
    assert break_even(rows[:1], 2) is None


def test_the_cli_lists_every_suite_the_matrix_runs():
    from kvpack.commands import eval as eval_command
    from kvpack.eval.matrix import SUITES

    assert eval_command._SUITES == SUITES
