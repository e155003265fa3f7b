"""``kvpack generate``: chat with a model through a kvpack cache, streamed; last line compares KV bytes."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

HELP = "generate text with a quantized KV cache (streamed) and report the KV bytes held vs an fp16 cache"

DTYPES = ("float32", "float16", "bfloat16")


def _config_fields() -> dict[str, list[tuple[str, object, object]]]:
    """Field name -> [(method, type, default)] over every registered method config."""
    import kvpack

    fields: dict[str, list[tuple[str, object, object]]] = {}
    for method in kvpack.method_names():
        config_cls = kvpack.config_class(method)
        hints = typing.get_type_hints(config_cls)
        for field in dataclasses.fields(config_cls):
            fields.setdefault(field.name, []).append((method, hints[field.name], field.default))
    return fields


def _flatten(annotation) -> set:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set(typing.get_args(annotation))
    return {annotation}


def _converter(kinds: set):
    """argparse ``type=`` for a config field whose annotations (over all methods) are ``kinds``."""
    optional = type(None) in kinds
    base = int if int in kinds else float if float in kinds else str

    def convert(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return base(text)
        except ValueError:
            expected = base.__name__ + (" or none" if optional else "")
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None

    convert.__name__ = base.__name__  # argparse names the type in its error messages
    return convert


def add_arguments(parser) -> None:
    import kvpack

    parser.add_argument("prompt", help="the user message (sent through the chat template unless --raw)")
    parser.add_argument("--method", choices=kvpack.method_names(), default="kivi", help="cache method (default kivi)")
    from kvpack.presets import PRESETS

    parser.add_argument("--preset", choices=tuple(PRESETS), metavar="NAME",
                        help=f"a named recipe instead of --method and its flags: {', '.join(PRESETS)} (kvpack info)")  # fmt: skip
    parser.add_argument(
        "--model", default=None, help="local model folder or .gguf file (default: embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    path = parser.add_mutually_exclusive_group()
    path.add_argument(
        "--fused", dest="fused", action="store_true", help="attend from the packed store (kvpack.enable; default)"
    )
    path.add_argument("--compat", dest="fused", action="store_false", help="attend over dequantized K/V")
    parser.set_defaults(fused=True)
    parser.add_argument(
        "--skip-layers", type=int, nargs="+", default=(), metavar="I", help="layers kept in full precision"
    )
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")

    sampling = parser.add_argument_group("generation")
    sampling.add_argument("--max-new-tokens", type=int, default=128, help="default 128")
    sampling.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    sampling.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --do-sample)")
    sampling.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (with --do-sample)")
    sampling.add_argument("--top-k", type=int, default=None, help="top-k sampling (with --do-sample)")
    sampling.add_argument("--seed", type=int, default=None, help="torch random seed")

    # One flag per config field, over every method; unset flags keep the method's default. A field whose flag
    # name is already taken (e.g. a method's `seed`) gets a `--config-` prefix.
    group = parser.add_argument_group("method config (unset: the method's default)")
    taken = {option for action in parser._actions for option in action.option_strings}
    for name, entries in _config_fields().items():
        flag = "--" + name.replace("_", "-")
        if flag in taken:
            flag = "--config-" + name.replace("_", "-")
        defaults = ", ".join(f"{method}: {default}" for method, _, default in entries)
        kinds = set().union(*(_flatten(kind) for _, kind, _ in entries))
        # SUPPRESS: an unset flag leaves no attribute, so that `none` can still mean None.
        common = dict(dest=f"config_{name}", default=argparse.SUPPRESS, help=f"default {defaults}")
        if kinds <= {bool}:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        else:
            group.add_argument(flag, type=_converter(kinds), metavar=name.upper(), **common)


def method_config_from_args(args):
    """The method config ``args`` ask for. Raises ``ValueError`` for a flag the method does not have."""
    import kvpack

    config_cls = kvpack.config_class(args.method)
    own = {field.name for field in dataclasses.fields(config_cls)}
    given = {key[len("config_") :]: value for key, value in vars(args).items() if key.startswith("config_")}
    foreign = sorted(set(given) - own)
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        verb = "does" if len(foreign) == 1 else "do"
        raise ValueError(f"{flags} {verb} not apply to --method {args.method}; its fields are {sorted(own)}")
    return config_cls(**given)


def run(args) -> int:
    import time

    import torch

    from kvpack.hf import enable, load_model, make_cache, runtime

    try:
        if args.preset is None:
            method_config = method_config_from_args(args)
        else:
            given = sorted(key for key in vars(args) if key.startswith("config_"))
            if given or args.method != "kivi":
                flags = ["--method"] if args.method != "kivi" else []
                flags += ["--" + key[len("config_") :].replace("_", "-") for key in given]
                raise ValueError(f"--preset sets the method and its config; drop {', '.join(flags)}")
            method_config = args.preset
    except ValueError as err:
        print(f"kvpack generate: error: {err}", file=sys.stderr)
        return 2
    if not args.do_sample and any(v is not None for v in (args.temperature, args.top_p, args.top_k)):
        print("kvpack generate: --temperature/--top-p/--top-k need --do-sample", file=sys.stderr)
        return 2
    if args.seed is not None:
        torch.manual_seed(args.seed)

    try:
        model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
        cache = make_cache(model, method_config, skip_layers=args.skip_layers)
    except (FileNotFoundError, ImportError, ValueError) as err:  # no such model, missing package, bad config
        print(f"kvpack generate: error: {err}", file=sys.stderr)
        return 2
    if args.fused:
        enable(model)

    if args.raw or not tokenizer.chat_template:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    else:
        messages = [{"role": "user", "content": args.prompt}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    inputs = {key: value.to(args.device) for key, value in inputs.items() if key in ("input_ids", "attention_mask")}

    sampling = {"do_sample": args.do_sample}  # the flags below were checked to come with --do-sample
    for name in ("temperature", "top_p", "top_k"):
        if getattr(args, name) is not None:
            sampling[name] = getattr(args, name)
    # Under torchrun (tensor parallelism), rank 0 alone prints.
    rank = (
        torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    )
    streamer = None if rank else runtime.text_streamer(tokenizer)
    start = time.perf_counter()
    with torch.no_grad():
        output = runtime.generate(
            model,
            cache,
            **inputs,
            max_new_tokens=args.max_new_tokens,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    seconds = time.perf_counter() - start
    if rank:
        return 0  # tensor parallel: rank 0 reports (every rank generated the same tokens)
    new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
    path = "fused" if args.fused else "compat"
    speed = f"{new_tokens} new tokens in {seconds:.1f} s, {new_tokens / seconds:.1f} tok/s"
    described = f"preset {args.preset}: {cache.method_config}" if args.preset else str(method_config)
    print(f"[{speed}; {described}; {path}]", file=sys.stderr)
    held, fp16 = cache.nbytes(), cache.fp16_nbytes()
    ratio = f"{held / fp16:.3f}x" if fp16 else "-"
    tokens = cache.get_seq_length()
    line = f"KV cache: {held:,} bytes held for {tokens} tokens vs {fp16:,} bytes in an fp16 cache ({ratio})"
    itemsize = getattr(torch, args.dtype).itemsize
    if itemsize != 2 and fp16:  # what this model's own DynamicCache would hold (its dtype), too
        own = fp16 * itemsize // 2
        line += f" and {own:,} in the model's own {args.dtype} cache ({held / own:.3f}x)"
    residual = max((getattr(c, "residual_length", 0) for c in (cache.method_config, *cache.layer_configs.values())),
                   default=0)  # fmt: skip
    if tokens <= residual:
        fp_dtype = str(cache.method_config.fp_dtype(getattr(torch, args.dtype))).removeprefix("torch.")
        line += f"; nothing is quantized below R = {residual} tokens (the fp residual is held in {fp_dtype})"
    print(line)
    return 0
