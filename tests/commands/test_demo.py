"""``kvpack demo``: every registered method setting runs on synthetic data and reports bytes and error."""

from __future__ import annotations

import re

import kvpack
from kvpack.cli import main


def test_demo_runs_every_registered_setting(capsys):
    assert main(["demo", "--tokens", "600"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}
    assert set(rows) == {"fp16", *kvpack.variants()}
    fp16_bytes = int(rows["fp16"][1].replace(",", ""))
    for label in kvpack.variants():
        held, ratio, bits, error = rows[label][1:]
        assert int(held.replace(",", "")) < fp16_bytes  # every method holds less than fp16 at 600 tokens
        assert float(ratio.rstrip("x")) > 1 and 0 < float(bits) < 16
        assert 0 <= float(error) < 1.5 and re.fullmatch(r"\d+\.\d{4}", error)
