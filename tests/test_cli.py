"""The ``cvt`` command line: every command registered with its own options, help and exit codes."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from torchcvt import cli, inference


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_has_working_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cvt {name}") and cli.COMMANDS[name].help in out


ARGVS = {
    "summary": ["cvt-13", "--image-size", "384"],
    "models": [],
    "predict": ["a.jpg", "photos", "--weights", "cvt-13", "--top-k", "3", "--format", "csv", "--on-error", "skip"],
    "attention": ["img.png", "--weights", "w", "--output", "o.png", "--alpha", "0.3"],
    "train": ["--data", "photos", "--epochs", "2", "--randaugment", "none"],
    "eval": ["--weights", "w", "--data", "digits", "--format", "json"],
    "bench": [],
    "export": ["--weights", "w", "--format", "onnx", "--output", "o.onnx"],
    "serve": ["--weights", "w", "--port", "8080", "--max-batch-size", "16", "--threads", "1"],
}


def test_each_command_parses_with_its_own_options():
    # Through `cvt`, a command's options parse exactly as its module's add_arguments declares them
    # on a parser of its own, plus the command's name: no option leaks from one command to another.
    assert set(ARGVS) == set(cli.COMMANDS)
    parser = cli.build_parser()
    for name, argv in ARGVS.items():
        alone = argparse.ArgumentParser()
        cli.COMMANDS[name].add_arguments(alone)
        assert vars(parser.parse_args([name, *argv])) == {"command": name, **vars(alone.parse_args(argv))}, name


def test_models_and_predict_are_separate_commands(capsys):
    parser = cli.build_parser()
    assert vars(parser.parse_args(["models"])) == {"command": "models"}
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["models", "--top-k", "3"])  # a predict option
    assert exit_info.value.code == 2
    # The defaults docs/inference.md gives for `cvt predict`.
    args = parser.parse_args(["predict", "x.png", "--weights", "w"])
    assert (args.inputs, args.weights, args.top_k, args.batch_size, args.device, args.dtype) == \
        (["x.png"], "w", 5, 32, None, "float32")
    assert (args.format, args.output, args.on_error, args.workers) == ("table", None, "stop", None)
    capsys.readouterr()
    assert cli.main(["models"]) == 0
    assert capsys.readouterr().out == inference.format_models()


def test_exit_codes(capsys):
    assert cli.main([]) == 0 and capsys.readouterr().out.startswith("usage: cvt")  # no command: the help
    for argv in (["nope"], ["predict", "x.png"]):  # unknown command; a required option missing
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith("usage: cvt")
    assert cli.main(["predict", "--weights", "w", "missing.png"]) == 1  # torchcvt's own errors: one line
    err = capsys.readouterr().err
    assert err.startswith("error: missing.png: no such file") and err.count("\n") == 1


def test_python_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "torchcvt", "--help"], capture_output=True, text=True, check=True).stdout
    for command in cli.COMMANDS:
        assert command in out
