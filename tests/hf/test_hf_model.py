"""kvpack.hf on the embedded SmolLM2-135M-Instruct (float32, CPU): 30 layers, 9 query / 3 kv heads, head_dim 64.

References are DynamicCache runs in the same process; no expected strings come from elsewhere.
"""

import contextlib
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

import kvpack  # noqa: E402
from kvpack.hf import disable, enable, make_cache  # noqa: E402

pytestmark = pytest.mark.model

PATHS = [pytest.param(False, id="compat"), pytest.param(True, id="fused")]
# transformers' own quantized-cache check: 4 bits, groups of 16, fp residual of 16.
KIVI4 = kvpack.KIVIConfig(key_bits=4, value_bits=4, group_size=16, residual_length=16)
SEQUENCE_PROMPTS = ["A sequence: 1, 2, 3, 4, 5", "A sequence: A, B, C"]


def method_configs():
    """KIVI and QJL at their defaults; QJL only once it is registered."""
    configs = [pytest.param(kvpack.KIVIConfig(), id="kivi")]
    if hasattr(kvpack, "QJLConfig"):
        configs.append(pytest.param(kvpack.QJLConfig(), id="qjl"))
    else:
        configs.append(pytest.param(None, id="qjl", marks=pytest.mark.skip(reason="kvpack.QJLConfig not built yet")))
    return configs


def set_path(model, fused):
    (enable if fused else disable)(model)


def greedy(model, inputs, cache, max_new_tokens, **kwargs):
    return model.generate(
        **inputs,
        cache=cache,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )


def assert_greedy_matches(out, reference, prompt_length, reference_prompt_length=None, near_tie=0.1):
    """``out``'s new tokens equal ``reference``'s (both generate outputs with logits) up to the first step where
    the reference's two best logits are within ``near_tie``: quantization noise may flip a near tie, and
    everything after it then differs. At least half of the tokens must be checked."""
    logits = torch.stack(reference.logits, dim=1)  # (B, steps, vocab)
    best = logits.topk(2, dim=-1).values
    tie = (best[..., 0] - best[..., 1]) < near_tie  # (B, steps)
    if reference_prompt_length is None:
        reference_prompt_length = prompt_length
    new, expected = out.sequences[:, prompt_length:], reference.sequences[:, reference_prompt_length:]
    assert new.shape == expected.shape
    checked = 0
    for row in range(new.shape[0]):
        stop = int(tie[row].nonzero()[0]) if tie[row].any() else tie.shape[1]
        assert torch.equal(new[row, :stop], expected[row, :stop]), f"row {row} differs before step {stop}"
        checked += stop
    assert checked >= new.numel() / 2, f"only {checked} of {new.numel()} tokens were away from near ties"


def left_padded(tokenizer, prompts, extra_padding=0):
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    if extra_padding:
        batch = inputs.input_ids.shape[0]
        pad = torch.full((batch, extra_padding), tokenizer.pad_token_id, dtype=inputs.input_ids.dtype)
        inputs["input_ids"] = torch.cat([pad, inputs.input_ids], dim=1)
        inputs["attention_mask"] = torch.cat([torch.zeros_like(pad), inputs.attention_mask], dim=1)
    return dict(inputs)


@pytest.fixture(scope="module")
def reference_runs():
    """Memo of DynamicCache runs shared by the parametrized tests of this module: key -> result."""
    return {}


def memo(runs, key, run):
    if key not in runs:
        runs[key] = run()
    return runs[key]


def continue_twice(model, inputs, follow_up, cache, max_new_tokens=12):
    """Generate, append ``follow_up`` (B, T_new) to the output, generate again from the same cache."""
    first = greedy(model, inputs, cache, max_new_tokens).sequences
    ids = torch.cat([first, follow_up], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids[:, inputs["input_ids"].shape[1] :])], dim=1)
    second = greedy(model, {"input_ids": ids, "attention_mask": mask}, cache, max_new_tokens)
    assert cache.get_seq_length() == second.sequences.shape[1] - 1
    return first, ids.shape[1], second


@pytest.mark.parametrize("config", method_configs())
def test_fp_residual_gives_exactly_the_dynamic_cache_run(embedded_model, config):
    """residual_length >= total length: nothing is quantized, tokens and logits are bit-identical."""
    model, tokenizer = embedded_model
    inputs = dict(tokenizer(["The cat sat on the mat because"], return_tensors="pt"))
    reference = greedy(model, inputs, DynamicCache(config=model.config), 16)
    cache = make_cache(model, config, residual_length=64)
    out = greedy(model, inputs, cache, 16)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits))
    assert cache.get_seq_length() < 64


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("group_residual", [(16, 16), (8, 8)], ids=["g16r16", "g8r8"])
def test_the_cat_kivi4_greedy_text_matches(embedded_model, fused, group_residual, reference_runs):
    """transformers' quantized-cache check ("The cat", greedy, 10 new tokens, 4 bits, groups/residual of 16).

    With kvpack's residual rule 2 + 10 tokens stay in fp at R = 16; g8r8 really quantizes most of them.
    """
    model, tokenizer = embedded_model
    inputs = dict(tokenizer(["The cat"], return_tensors="pt"))
    reference = memo(reference_runs, "the cat", lambda: greedy(model, inputs, DynamicCache(config=model.config), 10))
    set_path(model, fused)
    group_size, residual_length = group_residual
    cache = make_cache(model, KIVI4, group_size=group_size, residual_length=residual_length)
    out = greedy(model, inputs, cache, 10)
    assert tokenizer.batch_decode(out.sequences) == tokenizer.batch_decode(reference.sequences)


@pytest.mark.parametrize("fused", PATHS)
def test_kivi4_batched_left_padded_greedy_matches(embedded_model, fused, reference_runs):
    model, tokenizer = embedded_model
    inputs = left_padded(tokenizer, SEQUENCE_PROMPTS)
    width = inputs["input_ids"].shape[1]
    reference = memo(reference_runs, "batched", lambda: greedy(model, inputs, DynamicCache(config=model.config), 20))
    set_path(model, fused)
    cache = make_cache(model, KIVI4)
    assert_greedy_matches(greedy(model, inputs, cache, 20), reference, width)
    assert cache.layers[0].store.keys.num_rows > 0  # the prompts were quantized

    # Extra left padding shifts every token against the quantization groups; the text stays the same.
    padded = left_padded(tokenizer, SEQUENCE_PROMPTS, extra_padding=7)
    assert_greedy_matches(greedy(model, padded, make_cache(model, KIVI4), 20), reference, width + 7, width)


@pytest.mark.parametrize("fused", PATHS)
def test_kivi4_beam_search_matches(embedded_model, fused, reference_runs):
    model, tokenizer = embedded_model
    inputs = left_padded(tokenizer, SEQUENCE_PROMPTS)
    kwargs = {"num_beams": 2, "num_return_sequences": 2}
    expected = memo(
        reference_runs,
        "beams",
        lambda: greedy(model, inputs, DynamicCache(config=model.config), 16, **kwargs).sequences,
    )
    set_path(model, fused)
    assert torch.equal(greedy(model, inputs, make_cache(model, KIVI4), 16, **kwargs).sequences, expected)


@pytest.mark.parametrize("fused", PATHS)
def test_kivi4_continues_from_a_returned_cache(embedded_model, fused, reference_runs):
    model, tokenizer = embedded_model
    inputs = left_padded(tokenizer, SEQUENCE_PROMPTS)
    follow_up = tokenizer(" and then", return_tensors="pt").input_ids.repeat(2, 1)  # (2, T_new)
    first, width, reference = memo(
        reference_runs, "continue", lambda: continue_twice(model, inputs, follow_up, DynamicCache(config=model.config))
    )
    set_path(model, fused)
    kv_first, kv_width, out = continue_twice(model, inputs, follow_up, make_cache(model, KIVI4))
    assert torch.equal(kv_first, first) and kv_width == width
    assert_greedy_matches(out, reference, width)


@pytest.mark.parametrize("config", method_configs())
def test_fused_and_compat_logits_agree_on_a_long_prompt(embedded_model, config, fused_and_compat_logits):
    """600-token prompt (batch 2, one row left padded) + 50 decode steps, GQA 9/3 heads, default configs:
    512 prompt tokens are quantized at prefill, the next 128 flush at decode step 40. The prefill itself is
    compared on the tiny model (test_hf_cache.py, chunked), which keeps this test affordable."""
    model, tokenizer = embedded_model
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(100, model.config.vocab_size - 100, (2, 600), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :37], attention_mask[1, :37] = tokenizer.pad_token_id, 0
    cache = make_cache(model, config)
    compat, fused = fused_and_compat_logits(model, cache, input_ids, attention_mask, steps=50, compare_prefill=False)
    assert cache.get_seq_length() == 650 and cache.layers[0].store.keys.num_rows == 640 // config.group_size
    assert cache.nbytes() < cache.fp16_nbytes()
    torch.testing.assert_close(fused, compat, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize(
    "method, fused, spelling",
    [
        ("kivi", False, "past_key_values"),
        ("kivi", True, "cache"),
        ("qjl", False, "cache"),
        ("qjl", True, "past_key_values"),
    ],
)
def test_generate_accepts_a_kvpack_cache(embedded_model, method, fused, spelling):
    """Both spellings: ``cache=`` (transformers 5.24's name) and the deprecated ``past_key_values=``."""
    if method not in kvpack.method_names():
        pytest.skip(f"kvpack has no {method!r} method yet")
    model, tokenizer = embedded_model
    set_path(model, fused)
    inputs = dict(tokenizer(["Here is a short story about a lighthouse keeper."], return_tensors="pt"))
    cache = make_cache(model, method, group_size=16, residual_length=16)
    deprecated = spelling == "past_key_values"
    with pytest.warns(FutureWarning, match="past_key_values") if deprecated else contextlib.nullcontext():
        out = model.generate(**inputs, **{spelling: cache}, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 12
    assert cache.get_seq_length() == out.shape[1] - 1 and cache.layers[0].store.keys.num_rows > 0
    assert cache.nbytes() == sum(layer.nbytes() for layer in cache.layers) > 0


def test_generate_command_prints_the_bytes_line(embedded_model, capsys):
    from kvpack.cli import main

    rc = main(
        ["generate", "Name a colour.", "--max-new-tokens", "8", "--key-bits", "4", "--residual-length", "32", "--fused"]
    )
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("KV cache: ") and "bytes held for" in last and "in an fp16 cache" in last
    assert "in the model's own float32 cache" in last  # the embedded model runs in float32
    held, fp16, own = (int(x.replace(",", "")) for x in re.findall(r"([\d,]+) (?:bytes|in the)", last)[:3])
    assert own == 2 * fp16 and held < own
    rc = main(["generate", "Name a colour.", "--max-new-tokens", "2", "--preset", "kv3"])
    assert rc == 0 and "nothing is quantized below R = 128" in capsys.readouterr().out


def test_integration_doc_examples_run(embedded_model, capsys):
    """The Python blocks of docs/INTEGRATION.md run as written."""
    doc = (Path(__file__).parents[2] / "docs" / "INTEGRATION.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/INTEGRATION.md", "exec"), {})
    assert "bytes held vs" in capsys.readouterr().out
