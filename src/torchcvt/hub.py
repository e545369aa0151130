"""Publishing to the Hugging Face Hub: ``push_to_hub`` in Python and ``cvt push FOLDER REPO_ID``.

What goes up is the model in transformers' layout and nothing else a run folder holds:
``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``), ``preprocessor_config.json`` and
``README.md``, the model card (modelcard.py; written if the folder has none, its repository name
filled in if torchcvt wrote it, a user's own uploaded as it is). ``last.pt``/``best.pt`` (optimizer
state, RNG states: large, and pickles) only with ``include_checkpoints=True``. A model, a checkpoint
file or a folder without that layout (an official ``.pth``) is first written with ``save_pretrained``
in a temporary folder.

The upload is huggingface_hub's ``create_repo`` (kept if it exists) and one ``create_commit`` with
exactly those files. The token is ``token``, else huggingface_hub's (``HF_TOKEN``, ``hf auth login``).
Offline (``HF_HUB_OFFLINE=1``), unreachable, or refused: one line, a ``HubError``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from .checkpoint import WEIGHT_FILES, is_hub_id, save_pretrained
from .config import CvTConfig
from .errors import ConfigError, HubError
from .model import CvT
from .modelcard import CARD_NAME, PLACEHOLDER_REPO, is_torchcvt_card, model_card
from .pretrained import load_model, preprocess_config_of
from .transforms import PREPROCESSOR_CONFIG_NAME, read_preprocessor_config

CHECKPOINT_FILES = ("last.pt", "best.pt")
DEFAULT_MESSAGE = "Upload CvT model with torchcvt"


class Pushed(NamedTuple):
    url: str  # the commit (or pull request) on the hub
    files: list[str]  # what was uploaded, as named in the repository


def push_to_hub(
    folder_or_model: str | os.PathLike | nn.Module,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = DEFAULT_MESSAGE,
    create_pr: bool = False,
    include_checkpoints: bool = False,
) -> Pushed:
    """Upload a model, a run or checkpoint folder, or a checkpoint file to the hub repository ``repo_id``
    (``owner/name``; created, ``private`` if asked, when it does not exist). See the module docstring."""
    import huggingface_hub.constants

    if not isinstance(repo_id, str) or not is_hub_id(repo_id):
        raise ConfigError(f"repo_id must be a Hugging Face Hub id, owner/name, got {repo_id!r}")
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise HubError(f"cannot upload to {repo_id}: huggingface_hub is in offline mode (HF_HUB_OFFLINE=1); unset it to upload")
    source = None if isinstance(folder_or_model, nn.Module) else Path(folder_or_model).expanduser()
    if source is not None and not source.exists():
        raise ConfigError(f"{source}: no such file or folder to upload")
    with tempfile.TemporaryDirectory(prefix="cvt-push-") as tmp:
        folder = _transformers_folder(folder_or_model, source, Path(tmp))
        operations = _operations(folder, repo_id)
        if include_checkpoints and source is not None:
            home = source if source.is_dir() else source.parent
            operations += [_add(name, home / name) for name in CHECKPOINT_FILES if (home / name).is_file()]
        return _upload(repo_id, operations, private=private, token=token, revision=revision,
                       commit_message=commit_message, create_pr=create_pr)


def _transformers_folder(folder_or_model: Any, source: Path | None, tmp: Path) -> Path:
    """A folder with config.json and weights: ``source`` itself when it is one, else the model written to ``tmp``."""
    if source is not None and source.is_dir() and (source / "config.json").is_file() and any((source / w).is_file() for w in WEIGHT_FILES):
        return source
    model = folder_or_model if source is None else load_model(source)
    if not isinstance(model, CvT):  # a features_only model, say, is no classifier to publish
        raise ConfigError(f"push_to_hub takes a torchcvt CvT, a folder or a checkpoint file, got {type(model).__name__}")
    return save_pretrained(model, tmp, preprocess=preprocess_config_of(model))


def _add(path_in_repo: str, content: Path | bytes) -> Any:
    from huggingface_hub import CommitOperationAdd

    return CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=content if isinstance(content, bytes) else str(content))


def _operations(folder: Path, repo_id: str) -> list[Any]:
    """The files that make the model, and its card."""
    names = ["config.json", next(w for w in WEIGHT_FILES if (folder / w).is_file())]
    if (folder / PREPROCESSOR_CONFIG_NAME).is_file():
        names.append(PREPROCESSOR_CONFIG_NAME)
    operations = [_add(name, folder / name) for name in names]
    card = folder / CARD_NAME
    if not card.is_file():
        text = model_card(CvTConfig.load(folder), preprocess=read_preprocessor_config(folder), repo_id=repo_id)
        operations.append(_add(CARD_NAME, text.encode()))
    elif is_torchcvt_card(card):
        operations.append(_add(CARD_NAME, card.read_text(encoding="utf-8").replace(PLACEHOLDER_REPO, repo_id).encode()))
    else:
        operations.append(_add(CARD_NAME, card))  # the user's own, as it is
    return operations


def _upload(repo_id: str, operations: list[Any], *, private: bool, token: str | None, revision: str | None,
            commit_message: str, create_pr: bool) -> Pushed:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision, create_pr=create_pr)
    except Exception as exc:  # offline, unreachable, refused: all end the same way for the user
        raise HubError(_reason(exc, repo_id)) from None
    return Pushed(str(info.pr_url or info.commit_url), [op.path_in_repo for op in operations])


def _reason(exc: Exception, repo_id: str) -> str:
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return f"cannot upload to {repo_id}: huggingface_hub is in offline mode (HF_HUB_OFFLINE=1); unset it to upload"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return (f"not allowed to write to {repo_id} on the Hugging Face Hub (HTTP {status}): log in with `hf auth login` "
                "or pass a write token (--token, or HF_TOKEN)")
    text = str(exc).strip()
    reason = text.splitlines()[0][:200] if text else type(exc).__name__
    return f"cannot upload to {repo_id} on the Hugging Face Hub: {reason}"


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="FOLDER",
                        help="a run or checkpoint folder (config.json + model.safetensors), or any checkpoint torchcvt reads "
                             "(a .pt, an official .pth: converted first)")
    parser.add_argument("repo_id", metavar="REPO_ID", help="the hub repository, owner/name (created when it does not exist)")
    parser.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps its visibility)")
    parser.add_argument("--token", default=None, help="a hub token with write access (default: HF_TOKEN, else `hf auth login`'s)")
    parser.add_argument("--revision", default=None, help="the branch to commit to (default: main)")
    parser.add_argument("--commit-message", default=DEFAULT_MESSAGE, help="the commit message (default: %(default)s)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    parser.add_argument("--include-checkpoints", action="store_true",
                        help="also upload last.pt and best.pt (training state, pickled; not by default)")


def run(args: argparse.Namespace) -> int:
    pushed = push_to_hub(args.source, args.repo_id, private=args.private, token=args.token, revision=args.revision,
                         commit_message=args.commit_message, create_pr=args.create_pr,
                         include_checkpoints=args.include_checkpoints)
    print(f"uploaded {', '.join(pushed.files)} to {args.repo_id}: {pushed.url}")
    return 0
