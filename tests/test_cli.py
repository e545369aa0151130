"""The ``cvt`` command line: every command registered with its own options, help and exit codes."""

from __future__ import annotations

import argparse
import shlex
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
    "eval": ["--weights", "w", "--data", "digits", "--format", "json", "--errors", "wrong.csv"],
    "embed": ["photos", "--weights", "w", "--output", "f.safetensors", "--on-error", "skip"],
    "bench": [],
    "export": ["--weights", "w", "--format", "onnx", "--output", "o.onnx"],
    "push": ["runs/x", "me/x", "--private", "--include-checkpoints"],
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


def test_version(capsys):
    from torchcvt import __version__

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"torchcvt {__version__}\n"


def test_every_option_has_help_with_its_default_and_every_command_examples():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(cli.COMMANDS)
    for name, command in commands.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            what = f"cvt {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{what} has no help text"
            shown = formatter._expand_help(action)  # the text --help prints, default appended where due
            takes_value = action.option_strings and action.nargs != 0 and not action.required
            assert not takes_value or "default" in shown.lower(), f"{what} does not show its default: {shown!r}"
        # The help ends with two or three examples, each a command line of this command.
        epilog = command.format_help().rstrip().split("\nexamples:\n")
        assert len(epilog) == 2, f"cvt {name} --help has no examples"
        lines = [line.strip() for line in epilog[1].splitlines()]
        assert 2 <= len(lines) <= 3 and all(f" {name}" in line or line == f"cvt {name}" for line in lines), lines
        for line in lines:  # each example parses: its words from the command's name up to a comment or a pipe
            words = shlex.split(line, comments=True)
            words = words[words.index(name):]
            parser.parse_args(words[:words.index("|")] if "|" in words else words)


def test_attention_output_has_a_default(tmp_path, monkeypatch, capsys):
    from PIL import Image

    import torchcvt

    torchcvt.save_pretrained(torchcvt.create_model("cvt-tiny").eval(), tmp_path / "model")
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (40, 30), "white").save(tmp_path / "photos" / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["attention", "photos/cat.jpg", "--weights", "model", "--dpi", "20"]) == 0
    assert capsys.readouterr().out.startswith("wrote cat_attention.png: cat.jpg: ")
    with Image.open(tmp_path / "cat_attention.png") as image:
        assert image.format == "PNG" and image.size == (200, 100)  # 10x5 inches at 20 dpi
