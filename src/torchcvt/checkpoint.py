"""Every CvT checkpoint format, in and out: key maps, format detection, reading and writing files.

Formats read:

* ``transformers``: ``CvtForImageClassification`` / ``CvtModel`` state dicts (keys such as
  ``cvt.encoder.stages.0.layers.0.attention.attention.projection_query.weight``), from a directory
  with ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``, from those files alone,
  or from a Hugging Face Hub id ``owner/name`` (downloaded when online, else read from the cache).
* ``official``: microsoft/CvT ``.pth`` files (``CvT-13-224x224-IN-1k.pth``): a bare state dict
  with keys such as ``stage2.blocks.0.attn.conv_proj_k.bn.running_var``.
* ``torchcvt``: our own module names (``stages.2.blocks.0.attn...``), as in training checkpoints.

Format written: ``save_pretrained`` writes transformers' layout (``config.json`` + ``model.safetensors``
with transformers' key names), which ``CvtForImageClassification.from_pretrained`` loads unchanged.

This module converts and reads; it builds no model (``pretrained.load_model`` does, strictly,
with ``check_state_dict`` here listing every offending key). Pickles are only ever read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import CvTConfig
from .errors import CheckpointError, ConfigError
from .fileio import atomic_save
from .modelcard import transformers_differences, write_model_card
from .transforms import PreprocessConfig, read_preprocessor_config, write_preprocessor_config

logger = logging.getLogger("torchcvt")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")

# ----------------------------------------------------------------------------------- key mapping
# (torchcvt prefix, transformers prefix), matched longest first. Block level: inside
# stages.{i}.blocks.{j} <-> cvt.encoder.stages.{i}.layers.{j}.
_HF_BLOCK = [
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
    ("attn.proj.", "attention.output.dense."),
] + [
    pair
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value"))
    for pair in (
        (f"attn.proj_{ours}.", f"attention.attention.projection_{theirs}."),
        (f"attn.conv_proj_{ours}.conv.", f"attention.attention.convolution_projection_{theirs}.convolution_projection.convolution."),
        (f"attn.conv_proj_{ours}.bn.", f"attention.attention.convolution_projection_{theirs}.convolution_projection.normalization."),
    )
]
# Stage level: inside stages.{i} <-> cvt.encoder.stages.{i}.
_HF_STAGE = [
    ("patch_embed.proj.", "embedding.convolution_embeddings.projection."),
    ("patch_embed.norm.", "embedding.convolution_embeddings.normalization."),
    ("cls_token", "cls_token"),
]
_HF_TOP = [("norm.", "layernorm."), ("head.", "classifier.")]

_OURS_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$")
_OURS_STAGE = re.compile(r"^stages\.(\d+)\.(.+)$")
_HF_BLOCK_RE = re.compile(r"^(?:cvt\.)?encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)$")
_HF_STAGE_RE = re.compile(r"^(?:cvt\.)?encoder\.stages\.(\d+)\.(.+)$")


def _swap_prefix(rest: str, table: list[tuple[str, str]], reverse: bool) -> str | None:
    pairs = [(b, a) for a, b in table] if reverse else table
    for src, dst in sorted(pairs, key=lambda p: -len(p[0])):
        if rest.startswith(src):
            return dst + rest[len(src):]
    return None


def ours_to_hf_key(key: str) -> str:
    if m := _OURS_BLOCK.match(key):
        rest = _swap_prefix(m[3], _HF_BLOCK, reverse=False)
        if rest is not None:
            return f"cvt.encoder.stages.{m[1]}.layers.{m[2]}.{rest}"
    elif m := _OURS_STAGE.match(key):
        rest = _swap_prefix(m[2], _HF_STAGE, reverse=False)
        if rest is not None:
            return f"cvt.encoder.stages.{m[1]}.{rest}"
    else:
        rest = _swap_prefix(key, _HF_TOP, reverse=False)
        if rest is not None:
            return rest
    raise CheckpointError(f"no transformers name for parameter {key!r}")


def hf_to_ours_key(key: str) -> str:
    """transformers name -> torchcvt name; unknown keys come back unchanged (reported as unexpected)."""
    if m := _HF_BLOCK_RE.match(key):
        rest = _swap_prefix(m[3], _HF_BLOCK, reverse=True)
        return f"stages.{m[1]}.blocks.{m[2]}.{rest}" if rest is not None else key
    if m := _HF_STAGE_RE.match(key):
        rest = _swap_prefix(m[2], _HF_STAGE, reverse=True)
        return f"stages.{m[1]}.{rest}" if rest is not None else key
    rest = _swap_prefix(key, _HF_TOP, reverse=True)
    return rest if rest is not None else key


def official_to_ours_key(key: str) -> str:
    # microsoft/CvT names stage i ``stage{i}``; everything below it matches our names.
    return re.sub(r"^stage(\d+)\.", r"stages.\1.", key)


def ours_to_official_key(key: str) -> str:
    return re.sub(r"^stages\.(\d+)\.", r"stage\1.", key)


def detect_format(state_dict: dict[str, Any]) -> str:
    """'transformers', 'official' or 'torchcvt', from the key names."""
    keys = list(state_dict)
    if any(k.startswith(("cvt.encoder.", "encoder.stages.", "classifier.", "layernorm.")) for k in keys):
        return "transformers"
    if any(re.match(r"^stage\d+\.", k) for k in keys):
        return "official"
    if any(k.startswith("stages.") for k in keys):
        return "torchcvt"
    sample = ", ".join(keys[:3]) or "no keys"
    raise CheckpointError(f"not a CvT state dict (keys: {sample}, ...)")


def to_torchcvt_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Rename any supported layout to ours. Returns the renamed dict and the format it was in."""
    state_dict = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    fmt = detect_format(state_dict)
    rename = {"transformers": hf_to_ours_key, "official": official_to_ours_key, "torchcvt": lambda k: k}[fmt]
    return {rename(k): v for k, v in state_dict.items()}, fmt


def to_transformers_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {ours_to_hf_key(k): v for k, v in state_dict.items()}


def to_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {ours_to_official_key(k): v for k, v in state_dict.items()}


# ----------------------------------------------------------------------- inferring the layout
def infer_config_fields(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The config fields that the tensors themselves determine (torchcvt key names).

    Strides, paddings, heads and drop rates leave no trace in the weights and are not returned.
    """
    stages = sorted({int(m[1]) for k in state_dict if (m := re.match(r"^stages\.(\d+)\.", k))})
    if not stages or stages != list(range(len(stages))):
        raise CheckpointError(f"cannot find the stages of a CvT in the checkpoint (stage indices {stages})")
    f: dict[str, list] = {k: [] for k in ("embed_dim", "patch_sizes", "depth", "mlp_ratio", "qkv_bias", "cls_token", "kernel_qkv")}
    num_channels = None
    for i in stages:
        proj = state_dict.get(f"stages.{i}.patch_embed.proj.weight")
        if proj is None:
            raise CheckpointError(f"checkpoint has no stages.{i}.patch_embed.proj.weight (stage {i}'s embedding)")
        dim = proj.shape[0]
        if i == 0:
            num_channels = proj.shape[1]
        blocks = {int(m[1]) for k in state_dict if (m := re.match(rf"^stages\.{i}\.blocks\.(\d+)\.", k))}
        f["embed_dim"].append(dim)
        f["patch_sizes"].append(proj.shape[-1])
        f["depth"].append(len(blocks))
        fc1 = state_dict.get(f"stages.{i}.blocks.0.mlp.fc1.weight")
        f["mlp_ratio"].append(fc1.shape[0] / dim if fc1 is not None else 4.0)
        f["qkv_bias"].append(f"stages.{i}.blocks.0.attn.proj_q.bias" in state_dict)
        f["cls_token"].append(f"stages.{i}.cls_token" in state_dict)
        conv = state_dict.get(f"stages.{i}.blocks.0.attn.conv_proj_k.conv.weight")
        f["kernel_qkv"].append(conv.shape[-1] if conv is not None else None)
    fields: dict[str, Any] = {k: tuple(v) for k, v in f.items()}
    fields["num_channels"] = num_channels
    head = state_dict.get("head.weight")
    fields["num_classes"] = head.shape[0] if head is not None else 0
    if all(k is not None for k in fields["kernel_qkv"]):
        fields["qkv_projection_method"] = ("dw_bn",) * len(stages)
    else:
        fields["kernel_qkv"] = None  # avg or linear: no tensors, take them from the config
    return {k: v for k, v in fields.items() if v is not None}


def _fmt_shape(t: Any) -> str:
    return "x".join(map(str, t.shape)) if hasattr(t, "shape") else "?"


def check_state_dict(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], *, source: str, target: str) -> None:
    """Raise a CheckpointError listing every missing, unexpected and mis-shaped key."""
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    shapes = [k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        return

    def listing(keys: list[str], show) -> str:
        head = ", ".join(show(k) for k in keys[:6])
        return head + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): " + listing(shapes, lambda k: f"{k} checkpoint {_fmt_shape(given[k])} vs model {_fmt_shape(expected[k])}"))
    if missing:
        parts.append(f"{len(missing)} missing key(s): " + listing(missing, lambda k: f"{k} {_fmt_shape(expected[k])}"))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): " + listing(unexpected, lambda k: f"{k} {_fmt_shape(given[k])}"))
    try:
        inferred = infer_config_fields(given)
        exp = infer_config_fields(expected)
        diffs = [f"{k} {inferred[k]} vs {exp[k]}" for k in inferred if k in exp and inferred[k] != exp[k]]
        if diffs:
            parts.insert(0, "the checkpoint's layout differs: " + ", ".join(diffs) + " (checkpoint vs model)")
    except CheckpointError:
        pass
    raise CheckpointError(f"{source} does not fit {target}: " + "; ".join(parts))


# ------------------------------------------------------------------------------------ reading
@dataclass
class Checkpoint:
    """A checkpoint read from disk: tensors with torchcvt names, and what it says about itself."""

    state_dict: dict[str, torch.Tensor]
    config: CvTConfig | None  # from config.json or an embedded config; None for bare state dicts
    config_dict: dict[str, Any] | None  # the raw config.json, to know which fields it set
    format: str
    path: Path  # the weights file
    preprocess: PreprocessConfig | None = None  # the folder's preprocessor_config.json, if any


def is_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not source.startswith((".", "/"))


def download_from_hub(repo_id: str, revision: str | None = None) -> Path:
    """Fetch ``config.json`` + weights of a hub repository (uses the local cache when offline)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - it is a dependency
        raise CheckpointError("downloading from the Hugging Face Hub needs huggingface_hub (pip install huggingface_hub)") from None
    patterns = ["config.json", "preprocessor_config.json", *WEIGHT_FILES]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # network, missing repo, auth: all end the same way for the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot download {repo_id!r} from the Hugging Face Hub ({reason[:160]}); offline, pass a local "
            f"directory instead: one with config.json and model.safetensors or pytorch_model.bin "
            f"(e.g. --weights ./cvt-13 or create_model(weights='./cvt-13'))"
        ) from None


def resolve_source(source: str | os.PathLike) -> Path:
    """A local file or directory for a path or a hub id."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if isinstance(source, str) and is_hub_id(source):
        return download_from_hub(source)
    raise CheckpointError(f"{source}: no such file or directory, and not a Hugging Face Hub id (owner/name)")


def _what_it_is(head: bytes) -> str:
    """What a file that is no weights file holds, from its first bytes (for the error message)."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive that is no PyTorch checkpoint (it has no data.pkl)"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM")) or head[8:12] == b"WEBP":
        return "an image"
    if b"\x00" not in head:
        try:
            first = head.decode("utf-8").strip().splitlines()[0][:40] if head.strip() else ""
            return f"a text file (starting {first!r})"
        except (UnicodeDecodeError, IndexError):
            pass
    return "binary data of no known weights format"


def _is_safetensors(head: bytes, size: int) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header."""
    return len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8


def _is_torch_file(path: Path, head: bytes) -> bool:
    """torch.save's zip layout (``NAME/data.pkl`` inside), or the legacy pickle (protocol byte 0x80)."""
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                return any(n.endswith("/data.pkl") or n == "data.pkl" for n in archive.namelist())
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(f"{path}: a truncated or damaged zip file, as torch.save writes them ({exc})") from None
    return head[:1] == b"\x80"


def _pickle_refusal(path: Path, exc: Exception) -> CheckpointError:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f"Python objects other than tensors ({found[1]})" if found else "Python objects other than tensors"
    return CheckpointError(
        f"{path}: refused: it holds {what}, and unpickling them could run arbitrary code; if you trust the file, "
        "convert it once in a trusted environment (load it there, then write its tensors with "
        "safetensors.torch.save_file or torchcvt.save_pretrained) and pass the .safetensors file"
    )


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Tensors of one weights file, and a config embedded in it (our training checkpoints).

    What the file is comes from its first bytes, not its name: a CSV called ``model.pth`` is
    named as a text file, never handed to the unpickler.
    """
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(4096)
    if _is_safetensors(head, size):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), None
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: a damaged safetensors file ({_first_line(exc)})") from None
    if path.suffix == ".safetensors" or not _is_torch_file(path, head):
        kind = "not a safetensors file" if path.suffix == ".safetensors" else "not a checkpoint"
        raise CheckpointError(f"{path}: {kind}: {_what_it_is(head)}; expected safetensors weights or a file "
                              "written by torch.save (.pt, .pth, .bin)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "WeightsUnpickler" in str(exc) or "Unsupported" in str(exc):
            raise _pickle_refusal(path, exc) from None
        raise CheckpointError(f"{path}: a damaged PyTorch file ({_first_line(exc, skip='weights_only')})") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: a damaged PyTorch file ({_first_line(exc, skip='weights_only')})") from None
    embedded = None
    if isinstance(obj, dict):
        embedded = obj.get("config") if isinstance(obj.get("config"), dict) else None
        for key in ("model", "state_dict", "model_state_dict", "module"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    return obj, embedded


def _first_line(exc: BaseException, skip: str | None = None) -> str:
    """The first line of an exception's message, at most 200 characters; the exception's type when
    the message is empty or mentions ``skip`` (torch's advice to set weights_only=False, never repeated)."""
    lines = str(exc).strip().splitlines()
    if not lines or (skip and skip in str(exc)):
        return type(exc).__name__
    return lines[0][:200]


def check_finite(state_dict: dict[str, torch.Tensor], source: object) -> None:
    """Raise a CheckpointError naming the first tensors that hold NaN or infinite values."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        names = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        raise CheckpointError(
            f"{source}: {len(bad)} tensor(s) hold NaN or infinite values ({names}); such weights give NaN outputs. "
            "To load them anyway, for debugging: allow_nonfinite=True (--allow-nonfinite-weights on the command line)"
        )


def _read_config_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None


def read_checkpoint(source: str | os.PathLike, *, allow_nonfinite: bool = False) -> Checkpoint:
    """Read any supported checkpoint into torchcvt names (no model is built).

    Weights holding NaN or infinite values are refused (``check_finite``) unless ``allow_nonfinite``.
    """
    path = resolve_source(source)
    if path.is_dir():
        weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            candidates = sorted(p for p in path.iterdir() if p.suffix in (".safetensors",) + PICKLE_SUFFIXES)
            if len(candidates) != 1:
                raise CheckpointError(
                    f"{path}: expected model.safetensors or pytorch_model.bin (with config.json) in the directory, "
                    f"found {[p.name for p in candidates] or 'no weights file'}"
                )
            weights = candidates[0]
        folder: Path | None = path
    else:
        # transformers' files given alone still belong to their folder; beside a lone .pth, a
        # config.json or preprocessor_config.json could describe anything.
        weights = path
        folder = path.parent if path.name in WEIGHT_FILES else None
    config_dict = _read_config_json(folder / "config.json") if folder else None
    tensors, embedded = _load_tensors(weights)
    if not allow_nonfinite:
        check_finite(tensors, weights)
    config_dict = config_dict or embedded
    try:
        state_dict, fmt = to_torchcvt_state_dict(tensors)
    except CheckpointError as exc:
        raise CheckpointError(f"{weights}: {exc}") from None
    config = None
    if config_dict is not None:
        try:
            config = CvTConfig.from_dict(config_dict)
        except ConfigError as exc:
            raise CheckpointError(f"{path}: its config.json is not a CvT config: {exc}") from None
    preprocess = read_preprocessor_config(folder) if folder else None
    return Checkpoint(state_dict, config, config_dict, fmt, weights, preprocess)


def image_size_from_name(path: Path) -> int | None:
    """The resolution official files carry in their name: ``CvT-13-384x384-IN-1k.pth`` -> 384."""
    m = re.search(r"(\d{3})x\1", path.name)
    return int(m[1]) if m else None


# ------------------------------------------------------------------------------------ writing
def transformers_incompatibilities(config: CvTConfig) -> list[str]:
    """Why transformers' ``CvtForImageClassification`` cannot build ``config`` (empty: it can)."""
    return [d for d in transformers_differences(config) if not d.startswith("global_pool=")]


def save_pretrained(
    model: Any, directory: str | os.PathLike, *, safe_serialization: bool = True, preprocess: PreprocessConfig | None = None,
    model_card: bool = True,
) -> Path:
    """Write transformers' layout: ``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``),
    ``preprocessor_config.json`` describing the evaluation transform of the weights (default: the
    official recipe for the model's resolution) and, with ``model_card``, a ``README.md`` model card
    (modelcard.py; a README.md torchcvt did not write is kept). ``model`` needs only ``state_dict()``
    and a ``config`` (a CvTConfig). Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config: CvTConfig = model.config
    differences = transformers_differences(config)
    problems = transformers_incompatibilities(config)
    if problems:
        logger.warning("%s is readable by torchcvt but transformers cannot build its layout: %s",
                       directory, "; ".join(problems))
    elif differences:  # transformers would load it and compute something else, without a word
        logger.warning("transformers' CvT does not support %s: %s is readable by torchcvt, not by transformers",
                       ", ".join(differences), directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    hf_state = to_transformers_state_dict(state)
    if safe_serialization:
        from safetensors.torch import save_file

        atomic_save(lambda tmp: save_file(hf_state, tmp, metadata={"format": "pt"}), directory / "model.safetensors")
        (directory / "pytorch_model.bin").unlink(missing_ok=True)
    else:
        atomic_save(lambda tmp: torch.save(hf_state, tmp), directory / "pytorch_model.bin")
        (directory / "model.safetensors").unlink(missing_ok=True)
    config.save(directory / "config.json")
    write_preprocessor_config(preprocess or PreprocessConfig.for_resolution(config.image_size), directory)
    if model_card:
        params = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else None
        write_model_card(directory, config, pretrained_cfg=getattr(model, "pretrained_cfg", None), num_params=params)
    return directory


def save_official(model: Any, path: str | os.PathLike) -> Path:
    """Write a microsoft/CvT-style ``.pth`` (bare state dict with the official key names)."""
    path = Path(path)
    state = to_official_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    atomic_save(lambda tmp: torch.save(state, tmp), path)
    return path
