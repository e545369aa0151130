"""The ``cvt`` command line (also ``python -m torchcvt``).

Each sub-command lives in the module that owns its feature and is registered below, by name, with
its two functions: ``add_arguments(parser)``, which declares its options, and ``run(args) -> int``,
which does the work and returns the exit status, and two or three examples that end its ``--help``.
Every option's help states its default (``HelpFormatter`` appends it where the text does not). Errors torchcvt raises on purpose print as one
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

from . import attention_maps, bench, embed, evaluate, export, hub, inference, train
from .errors import TorchCvTError
from .fastpath import gemm_override
from .serve import command as serve
from .version import __version__

# By name: the package's attribute `torchcvt.summary` is the summary() function, not the module.
from .summary import add_arguments as add_summary_arguments, run as run_summary


@dataclass(frozen=True)
class Command:
    help: str  # one line, for `cvt --help` and the command's own --help
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    examples: tuple[str, ...] = ()  # command lines (with an optional "# comment"), the end of its --help


COMMANDS: dict[str, Command] = {
    "summary": Command(
        "per-stage token grid, channels, parameters and MACs of a model", add_summary_arguments, run_summary,
        ("cvt summary cvt-13", "cvt summary cvt-21-384 --image-size 448", "cvt summary runs/digits  # a checkpoint's layout"),
    ),
    "models": Command(
        "list the registry: named layouts and their public weights", inference.add_models_arguments, inference.run_models,
        ("cvt models", "cvt models | grep 22k"),
    ),
    "predict": Command(
        "classify images, folders or globs", inference.add_arguments, inference.run,
        ("cvt predict --weights cvt-13 cat.jpg", "cvt predict --weights runs/digits --top-k 3 runs/digits/images",
         "cvt predict --weights cvt-21-384-22k --format csv --output preds.csv 'photos/**/*.jpg'"),
    ),
    "attention": Command(
        "overlay the last stage's cls-token attention on an image", attention_maps.add_arguments, attention_maps.run,
        ("cvt attention --weights cvt-13 cat.jpg  # writes cat_attention.png",
         "cvt attention --weights runs/pets dog.jpg --output dog-attention.png --alpha 0.4"),
    ),
    "train": Command(
        "train or fine-tune (no arguments: the embedded digits demo)", train.add_arguments, train.run,
        ("cvt train  # the digits demo, runs/digits", "cvt train --data ./pets --weights cvt-13 --epochs 10",
         "torchrun --nproc_per_node 8 -m torchcvt train --data ./imagenet --model cvt-13 --batch-size 2048 --amp bf16"),
    ),
    "eval": Command(
        "top-1/top-5, per-class precision/recall/F1 and a confusion matrix", evaluate.add_arguments, evaluate.run,
        ("cvt eval --weights runs/digits --data digits",
         "cvt eval --weights runs/pets --data ./pets --format json --errors misclassified.csv"),
    ),
    "embed": Command(
        "pre-logit features of images, to .npz or .safetensors", embed.add_arguments, embed.run,
        ("cvt embed --weights cvt-13 --output features.npz photos/",
         "cvt embed --weights runs/pets --output pets.safetensors 'pets/**/*.jpg' --on-error skip"),
    ),
    "bench": Command(
        "time torchcvt against transformers' CvT on the same weights", bench.add_arguments, bench.run,
        ("cvt bench --quick", "cvt bench --model cvt-21 --batch-sizes 1,16 --threads 4"),
    ),
    "export": Command(
        "export to ONNX or torch.export and check the result", export.add_arguments, export.run,
        ("cvt export --weights runs/digits --format onnx --output cvt.onnx --dynamic",
         "cvt export --model cvt-13 --format pt2 --output cvt13.pt2  # random weights, the layout"),
    ),
    "push": Command(
        "upload a model folder to the Hugging Face Hub, with its model card", hub.add_arguments, hub.run,
        ("cvt push runs/pets me/cvt-13-pets", "cvt push runs/pets me/cvt-13-pets --private --include-checkpoints"),
    ),
    "serve": Command(
        "serve a model over HTTP: Open Inference Protocol v2, /predict, metrics, an upload page", serve.add_arguments, serve.run,
        ("cvt serve --weights cvt-13  # then open http://127.0.0.1:8000/ (API docs: /docs)",
         "cvt serve --weights runs/digits --name digits --max-batch-size 16 --max-delay-ms 10",
         "cvt serve --weights cvt-13 --host 0.0.0.0 --port 8080 --workers 2 --backend onnxruntime"),
    ),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; an option's default appended to its help unless the help states it
    (or there is nothing to state: a flag, or None where the help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or any(action.default is v for v in (None, False, argparse.SUPPRESS)) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def examples_epilog(examples: tuple[str, ...]) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in examples)


def build_parser() -> argparse.ArgumentParser:
    """``cvt`` with every command of ``COMMANDS``; the chosen one's name is ``args.command``."""
    parser = argparse.ArgumentParser(
        prog="cvt", description="CvT: the Convolutional Vision Transformer.", formatter_class=HelpFormatter,
        epilog=examples_epilog(("cvt train  # train a small CvT on the embedded digits", "cvt predict --weights cvt-13 cat.jpg",
                                "cvt COMMAND --help  # its options and examples")),
    )
    parser.add_argument("--version", action="version", version=f"torchcvt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help,
                                             epilog=examples_epilog(command.examples), formatter_class=HelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        gemm_override()  # a bad $TORCHCVT_GEMM stops here, before a command writes anything
        return int(COMMANDS[args.command].run(args) or 0)
    except (TorchCvTError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
