"""The ``cvt`` command line (also ``python -m torchcvt``).

Each sub-command lives in the module that owns its feature and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
command runs, so ``cvt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import TorchCvTError

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "summary": ("torchcvt.summary", "per-stage token grid, channels, parameters and MACs of a model"),
    "models": ("torchcvt.inference", "list presets and the public pretrained weights"),
    "predict": ("torchcvt.inference", "classify images, folders or globs"),
    "attention": ("torchcvt.attention_maps", "overlay the last stage's cls-token attention on an image"),
    "train": ("torchcvt.train", "train or fine-tune (no arguments: the embedded digits demo)"),
    "eval": ("torchcvt.evaluate", "top-1/top-5, per-class accuracy and a confusion matrix"),
    "bench": ("torchcvt.bench", "time torchcvt against transformers' CvT on the same weights"),
    "export": ("torchcvt.export", "export to ONNX or torch.export and check the result"),
}


def _command_module(name: str):
    module = importlib.import_module(COMMANDS[name][0])
    return module


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvt", description="CvT: the Convolutional Vision Transformer.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported; the others get an empty parser for --help.
        if name == wanted:
            _command_module(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(_command_module(args.command).run(args) or 0)
    except TorchCvTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
