"""MACs and parameters against the CvT paper (Table 2: CvT-13 4.5 G at 224, 16.3 G at 384; CvT-21 7.1 G)."""

from __future__ import annotations

import pytest

import torchcvt
from torchcvt.cli import main


@pytest.mark.parametrize("name, size, low, high", [("cvt-13", 224, 4.5, 4.6), ("cvt-13", 384, 16.2, 16.4), ("cvt-21", 224, 7.1, 7.3)])
def test_macs_match_paper(name, size, low, high):
    s = torchcvt.summary(torchcvt.create_model(name), size)
    assert low <= s.macs / 1e9 <= high
    assert sum(r.macs for r in s.stages) == s.macs
    assert sum(r.params for r in s.stages) == s.params


def test_stage_rows():
    s = torchcvt.summary(torchcvt.create_model("cvt-13"), 224)
    assert [(r.grid, r.channels, r.tokens) for r in s.stages[:3]] == [((56, 56), 64, 3136), ((28, 28), 192, 784), ((14, 14), 384, 197)]
    assert s.trainable_params == 19_997_480


def test_cli_summary(capsys):
    assert main(["summary", "cvt-13"]) == 0
    out = capsys.readouterr().out
    assert "MACs: 4.57 G" in out and "19,997,480" in out and "56x56" in out
    assert main(["summary", "cvt-13", "--image-size", "384"]) == 0
    assert "MACs: 16.27 G" in capsys.readouterr().out


def test_cli_errors_are_one_line(capsys):
    assert main(["summary", "cvt-99"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'cvt-99'") and err.count("\n") == 1
    assert main(["summary", "cvt-13", "--image-size", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: an input of 2x2 is too small") and err.count("\n") == 1

