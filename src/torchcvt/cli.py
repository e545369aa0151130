"""The ``cvt`` command line (also ``python -m torchcvt``).

Each sub-command lives in the module that owns its feature and is registered below, by name, with
its two functions: ``add_arguments(parser)``, which declares its options, and ``run(args) -> int``,
which does the work and returns the exit status. Errors torchcvt raises on purpose print as one
line, ``error: ...``, with exit status 1; argparse's usage errors exit with 2; Ctrl-C with 130.

Every command module is imported up front: ``import torchcvt`` already loads torch and the model,
and the command modules add about 0.1 s to the 2-3 s that takes (they import their heavy
libraries, matplotlib, scikit-learn, transformers, onnxruntime, only when a command needs them).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from . import attention_maps, bench, evaluate, export, inference, train
from .errors import TorchCvTError
from .serve import command as serve

# By name: the package's attribute `torchcvt.summary` is the summary() function, not the module.
from .summary import add_arguments as add_summary_arguments, run as run_summary


@dataclass(frozen=True)
class Command:
    help: str  # one line, for `cvt --help` and the command's own --help
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "summary": Command(
        "per-stage token grid, channels, parameters and MACs of a model", add_summary_arguments, run_summary
    ),
    "models": Command(
        "list the registry: named layouts and their public weights", inference.add_models_arguments, inference.run_models
    ),
    "predict": Command("classify images, folders or globs", inference.add_arguments, inference.run),
    "attention": Command(
        "overlay the last stage's cls-token attention on an image", attention_maps.add_arguments, attention_maps.run
    ),
    "train": Command("train or fine-tune (no arguments: the embedded digits demo)", train.add_arguments, train.run),
    "eval": Command("top-1/top-5, per-class accuracy and a confusion matrix", evaluate.add_arguments, evaluate.run),
    "bench": Command("time torchcvt against transformers' CvT on the same weights", bench.add_arguments, bench.run),
    "export": Command("export to ONNX or torch.export and check the result", export.add_arguments, export.run),
    "serve": Command("serve a model over HTTP: Open Inference Protocol v2, /predict, metrics, an upload page",
                     serve.add_arguments, serve.run),
}


def build_parser() -> argparse.ArgumentParser:
    """``cvt`` with every command of ``COMMANDS``; the chosen one's name is ``args.command``."""
    parser = argparse.ArgumentParser(prog="cvt", description="CvT: the Convolutional Vision Transformer.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(COMMANDS[args.command].run(args) or 0)
    except (TorchCvTError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
