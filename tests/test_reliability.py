"""Bad input and faults, as a user meets them: every failure is one line, and nothing the user had changes.

Each case of the matrix runs the command line in-process (``torchcvt.cli.main``) in a workspace that
holds files a user cares about (earlier exports, results, checkpoints), and asserts: the exit status
(1 for torchcvt's errors, 2 for argparse's), one ``error: ...`` line naming the problem, no
traceback, and the sha256 of every file (workspace and shared fixtures) unchanged, with no file
added or removed. The faults that need a real process (kill -9 mid-write, a full disk) run one.
docs/reliability.md lists every case with the test that checks it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from torchcvt import cli, fileio
from torchcvt.attention_maps import constant_maps, upsample
from torchcvt.checkpoint import save_pretrained, transformers_incompatibilities
from torchcvt.config import CvTConfig
from torchcvt.errors import DiskFullError, OutputError
from torchcvt.export import ONNX_OPSETS, onnx_opset
from torchcvt.model import CvT
from torchcvt.pretrained import create_model

SRC = Path(__file__).resolve().parents[1] / "src"
SMALL = dict(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 2, 3), num_classes=3, image_size=32)


class Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def png(path: Path, size=(40, 30), seed=0, mode="RGB") -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).convert(mode).save(path)
    return path


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    """Shared inputs, built once: a small checkpoint, bad weights of every kind, images, data folders."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    model = create_model(CvTConfig(**SMALL))
    save_pretrained(model, root / "ckpt")
    save_pretrained(create_model(CvTConfig(**SMALL, cls_token=(False, False, False))), root / "no-cls")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["stages.1.blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in state.items()}, root / "nan.safetensors")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.bias"][1] = float("inf")
    torch.save({"model": state}, root / "inf.pt")
    (root / "weights.csv").write_text("path,label\na.png,1\n")
    (root / "notes.pth").write_text("these are not weights\n")
    (root / "random.bin").write_bytes(b"\x01" + np.random.default_rng(0).bytes(999))
    (root / "empty.pt").write_bytes(b"")
    with zipfile.ZipFile(root / "archive.pt", "w") as z:
        z.writestr("readme.txt", "hello")
    (root / "header.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    (root / "damaged.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json}")
    torch.save({"w": torch.zeros(1000)}, root / "full.pt")
    (root / "truncated.pt").write_bytes((root / "full.pt").read_bytes()[:2000])
    torch.save({"model": {"stages.0.x": torch.zeros(1)}, "payload": Evil()}, root / "evil.pth")
    torch.save({"linear.weight": torch.zeros(2, 2)}, root / "other.pth")
    (root / "no-weights").mkdir()
    shutil.copytree(root / "ckpt", root / "bad-config")
    (root / "bad-config" / "config.json").write_text("{not json")
    png(root / "ok.png")
    (root / "corrupt.png").write_bytes((root / "ok.png").read_bytes()[:60])
    (root / "text.png").write_text("not an image")
    Image.new("1", (10000, 9000)).save(root / "huge.png")  # 90 Mpx: just over Pillow's 89.5 Mpx threshold
    Image.new("1", (14000, 13000)).save(root / "bomb.png")  # 182 Mpx: past Pillow's own refusal (2x)
    for c in range(3):
        for i in range(4):
            (root / "data" / f"c{c}").mkdir(parents=True, exist_ok=True)
            png(root / "data" / f"c{c}" / f"{i}.png", seed=10 * c + i)
    (root / "one-class" / "only").mkdir(parents=True)
    png(root / "one-class" / "only" / "a.png")
    (root / "bad.csv").write_text("a,b\n1,2\n")
    return root


def snapshot(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders (names included: an added or removed file shows)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A user's folder: earlier results and exports, a folder onto which an output is a directory,
    and the working directory (where a stray write would land)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an earlier, good export")
    (out / "model.onnx.json").write_text('{"earlier": true}\n')
    (out / "model.pt2").write_bytes(b"an earlier program")
    (out / "results.jsonl").write_text('{"path": "earlier"}\n')
    (out / "att.png").write_bytes(b"an earlier picture")
    (out / "adir").mkdir()
    (out / "side.onnx.json").mkdir()  # the description of side.onnx would land on a directory
    os.mkfifo(out / "pipe")  # not a file: renaming over it would replace it (as it would /dev/null)
    if Path("/dev/full").is_char_device():  # a file on a full disk: every write fails with ENOSPC
        (out / "full.jsonl").symlink_to("/dev/full")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


def make_read_only(folder: Path):
    """Make ``folder`` unwritable for this process (chmod, or as root the immutable attribute); returns
    the undo, or None when neither works here."""
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return lambda: folder.chmod(0o755)
    folder.chmod(0o755)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    return None


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


P, E, A, X = "predict", "eval", "attention", "export"


def predict(*options: str, weights: str = "{fx}/ckpt", image: str = "{fx}/ok.png") -> list[str]:
    return [P, image, "--weights", weights, *options]


def export(output: str, *options: str, fmt: str = "onnx", weights: str = "{fx}/ckpt") -> list[str]:
    return [X, "--weights", weights, "--format", fmt, "--output", output, *options]


def attention(output: str, *options: str, weights: str = "{fx}/ckpt", image: str = "{fx}/ok.png") -> list[str]:
    return [A, image, "--weights", weights, "--output", output, *options]


CASES = [
    # ---- weights that are no checkpoint, or not one to trust
    ("weights-csv", predict(weights="{fx}/weights.csv"), 1, "weights.csv: not a checkpoint: a text file"),
    ("weights-text-named-pth", predict(weights="{fx}/notes.pth"), 1, "notes.pth: not a checkpoint: a text file"),
    ("weights-random-bytes", predict(weights="{fx}/random.bin"), 1, "random.bin: not a checkpoint: binary data"),
    ("weights-empty", predict(weights="{fx}/empty.pt"), 1, "empty.pt: empty file, not a checkpoint"),
    ("weights-zip-not-torch", predict(weights="{fx}/archive.pt"), 1, "archive.pt: not a checkpoint: a zip archive"),
    ("weights-truncated-torch", predict(weights="{fx}/truncated.pt"), 1, "truncated.pt: a truncated or damaged zip"),
    ("safetensors-bad-header", predict(weights="{fx}/header.safetensors"), 1, "header.safetensors: not a safetensors file"),
    ("safetensors-damaged", predict(weights="{fx}/damaged.safetensors"), 1, "damaged.safetensors: a damaged safetensors file"),
    ("weights-malicious-pickle", predict(weights="{fx}/evil.pth"), 1, "unpickling them could run arbitrary code"),
    ("weights-nan", predict(weights="{fx}/nan.safetensors"), 1, "1 tensor(s) hold NaN or infinite values (stages.1.blocks.0.mlp.fc1.weight)"),
    ("weights-inf", predict(weights="{fx}/inf.pt"), 1, "inf.pt: 1 tensor(s) hold NaN or infinite values (head.bias)"),
    ("weights-other-network", predict(weights="{fx}/other.pth"), 1, "not a CvT state dict"),
    ("weights-folder-without-weights", predict(weights="{fx}/no-weights"), 1, "expected model.safetensors or pytorch_model.bin"),
    ("weights-broken-config", predict(weights="{fx}/bad-config"), 1, "config.json: invalid JSON"),
    ("weights-unknown-name", predict(weights="cvt-99"), 1, "unknown weights 'cvt-99'"),
    # ---- predict: outputs, images, options
    ("predict-output-missing-folder", predict("--output", "{ws}/nope/r.jsonl"), 1, "--output {ws}/nope/r.jsonl: folder {ws}/nope does not exist"),
    ("predict-output-directory", predict("--output", "{ws}/out/adir"), 1, "--output {ws}/out/adir: is a directory"),
    ("predict-output-read-only", predict("--output", "{ro}/r.jsonl"), 1, "--output {ro}/r.jsonl: cannot write in folder {ro}"),
    ("predict-output-full-disk", predict("--output", "{ws}/out/full.jsonl"), 1, "no space left on device writing {ws}/out/full.jsonl; it holds the results of the first 0 image(s)"),
    ("predict-image-over-limit", predict(image="{fx}/huge.png"), 1, "huge.png: refused before decoding: 10000x9000 = 90,000,000 pixels, over the limit of 89,478,485"),
    ("predict-image-past-pillow-refusal", predict(image="{fx}/bomb.png"), 1, "bomb.png: refused before decoding: over 178,956,970 pixels"),
    ("predict-lower-max-pixels", predict("--max-pixels", "100"), 1, "ok.png: refused before decoding: 40x30 = 1,200 pixels, over the limit of 100"),
    ("predict-corrupt-image", predict(image="{fx}/corrupt.png"), 1, "corrupt.png: cannot read image"),
    ("predict-text-named-png", predict(image="{fx}/text.png"), 1, "text.png: cannot read image: not an image"),
    ("predict-missing-input", predict(image="{ws}/missing.png"), 1, "missing.png: no such file or directory"),
    ("predict-top-k-zero", predict("--top-k", "0"), 1, "--top-k must be >= 1"),
    ("predict-max-pixels-negative", predict("--max-pixels", "-1"), 2, "--max-pixels: must be >= 0"),
    ("predict-max-pixels-not-a-number", predict("--max-pixels", "lots"), 2, "--max-pixels: expected a whole number"),
    ("predict-float16-on-cpu", predict("--dtype", "float16", "--device", "cpu"), 1, "float16 needs a CUDA device"),
    ("predict-bad-device", predict("--device", "toaster"), 1, "'toaster' is not a torch device"),
    # ---- eval
    ("eval-data-missing", [E, "--weights", "{fx}/ckpt", "--data", "{ws}/no-data"], 1, "data not found: {ws}/no-data"),
    ("eval-output-missing-folder", [E, "--weights", "{fx}/ckpt", "--data", "{fx}/data", "--output", "{ws}/nope/cm.png"], 1, "--output {ws}/nope/cm.png: folder {ws}/nope does not exist"),
    ("eval-output-read-only", [E, "--weights", "{fx}/ckpt", "--data", "{fx}/data", "--output", "{ro}/cm.png"], 1, "--output {ro}/cm.png: cannot write in folder"),
    ("eval-weights-nan", [E, "--weights", "{fx}/nan.safetensors", "--data", "{fx}/data"], 1, "hold NaN or infinite values"),
    ("eval-batch-size-zero", [E, "--weights", "{fx}/ckpt", "--data", "{fx}/data", "--batch-size", "0"], 1, "--batch-size must be >= 1"),
    ("eval-one-class", [E, "--weights", "{fx}/ckpt", "--data", "{fx}/one-class", "--output", "{ws}/out/cm.png"], 1, "found 1 class"),
    # ---- export
    ("export-opset-too-low", export("{ws}/out/model.onnx", "--opset", "3"), 1, "--opset 3: not available here; opsets that export CvT exactly and run in onnxruntime here: 18 to 25"),
    ("export-opset-too-high", export("{ws}/out/model.onnx", "--opset", "99"), 1, "--opset 99: not available here"),
    ("export-opset-with-pt2", export("{ws}/out/m.pt2", "--opset", "18", fmt="pt2"), 1, "--opset applies to --format onnx only"),
    ("export-output-read-only", export("{ro}/model.onnx"), 1, "--output {ro}/model.onnx: cannot write in folder {ro}"),
    ("export-output-missing-folder", export("{ws}/nope/m.onnx"), 1, "--output {ws}/nope/m.onnx: folder {ws}/nope does not exist"),
    ("export-output-directory", export("{ws}/out/adir"), 1, "--output {ws}/out/adir: is a directory"),
    ("export-sidecar-directory", export("{ws}/out/side.onnx"), 1, "its description {ws}/out/side.onnx.json is a directory"),
    ("export-nothing-to-export", [X, "--format", "onnx", "--output", "{ws}/out/model.onnx"], 1, "pass --weights"),
    ("export-malicious-pickle", export("{ws}/out/model.onnx", weights="{fx}/evil.pth"), 1, "could run arbitrary code"),
    ("export-image-size-too-small", export("{ws}/out/model.onnx", "--image-size", "2"), 1, "--image-size 2"),
    ("export-check-fails", export("{ws}/out/model.pt2", "--tolerance", "-1", fmt="pt2"), 1, "the exported model differs from PyTorch"),
    # ---- attention
    ("attention-output-missing-folder", attention("{ws}/nope/a.png"), 1, "--output {ws}/nope/a.png: folder {ws}/nope does not exist"),
    ("attention-output-directory", attention("{ws}/out/adir"), 1, "--output {ws}/out/adir: is a directory"),
    ("attention-output-pipe", attention("{ws}/out/pipe"), 1, "--output {ws}/out/pipe: not a regular file (a device, a pipe or a socket)"),
    ("attention-alpha", attention("{ws}/out/att.png", "--alpha", "2"), 1, "--alpha must lie in 0..1"),
    ("attention-missing-image", attention("{ws}/out/att.png", image="{ws}/missing.png"), 1, "missing.png: cannot read image: no such file"),
    ("attention-image-over-limit", attention("{ws}/out/att.png", image="{fx}/huge.png"), 1, "huge.png: refused before decoding"),
    ("attention-no-cls-token", attention("{ws}/out/att.png", weights="{fx}/no-cls"), 1, "attention maps need a cls token"),
    # ---- summary, models
    ("summary-unknown-name", ["summary", "cvt-99"], 1, "unknown model 'cvt-99'"),
    ("summary-not-a-checkpoint", ["summary", "{fx}/weights.csv"], 1, "weights.csv: not a checkpoint"),
    ("summary-image-too-small", ["summary", "cvt-13", "--image-size", "2"], 1, "too small"),
    ("models-foreign-option", ["models", "--top-k", "3"], 2, "unrecognized arguments: --top-k 3"),
    # ---- train: the checks before the training loop
    ("train-data-missing", ["train", "--data", "{ws}/no-data", "--output", "{ws}/run"], 1, "data not found: {ws}/no-data"),
    ("train-data-bad-csv", ["train", "--data", "{fx}/bad.csv", "--output", "{ws}/run"], 1, "header must have columns 'path' and 'label'"),
    ("train-weights-not-a-checkpoint", ["train", "--data", "digits", "--weights", "{fx}/weights.csv", "--output", "{ws}/run"], 1, "weights.csv: not a checkpoint"),
]


@pytest.mark.parametrize("argv, code, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(fx, workspace, capsys, argv, code, expected):
    fill = {"fx": str(fx), "ws": str(workspace), "ro": str(workspace / "ro")}
    undo = None
    if "full" in " ".join(argv) and not (workspace / "out" / "full.jsonl").is_symlink():
        pytest.skip("needs /dev/full")
    if any("{ro}" in a for a in argv):
        (workspace / "ro").mkdir()
        (workspace / "ro" / "model.onnx").write_bytes(b"an export in a read-only folder")
        undo = make_read_only(workspace / "ro")
        if undo is None:
            pytest.skip("no way to make a folder read-only for this process here")
    before = snapshot(workspace, fx)
    try:
        rc, out, err = run_cli(capsys, [a.format(**fill) for a in argv])
    finally:
        if undo:
            undo()
    lines = err.strip().splitlines()
    assert rc == code, err
    assert "Traceback" not in err and "Warning" not in err, err
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    else:  # argparse: its usage line, then one error line
        assert lines[-1].startswith("cvt") and ": error: " in lines[-1], err
    assert expected.format(**fill) in lines[-1], err
    assert snapshot(workspace, fx) == before
    assert not (workspace / "cwd" / "PWNED").exists()


def test_the_matrix_is_large():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


# ------------------------------------------------------------------------------ atomic writes
@pytest.mark.parametrize("writer", ["torch.save", "text"])
def test_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, writer):
    # /dev/full answers every write with ENOSPC; torch.save reports it as "unexpected pos" or
    # "PytorchStreamWriter failed writing file", which must become one DiskFullError too. The writers
    # get a link to it, so that a writer renaming its own temporary file could only replace the link.
    if not Path("/dev/full").is_char_device():
        pytest.skip("needs /dev/full")
    full = tmp_path / "full"
    full.symlink_to("/dev/full")
    target = tmp_path / "run" / "last.pt"
    target.parent.mkdir()
    target.write_bytes(b"the previous checkpoint")
    before = snapshot(tmp_path / "run")
    state = {"w": torch.zeros(10_000)}
    write = {
        "torch.save": lambda tmp: torch.save(state, str(full)),
        "text": lambda tmp: full.write_text("x" * 100_000),
    }[writer]
    with pytest.raises(DiskFullError) as err:
        fileio.atomic_save(write, target)
    assert str(err.value) == (f"no space left on device writing {target}; the previous last.pt is intact "
                              "(free some space and run again)")
    assert snapshot(tmp_path / "run") == before  # no temporary file left either


def test_files_follow_the_umask_and_keep_the_mode_they_had(tmp_path):
    old = os.umask(0o027)
    try:
        fileio.atomic_write_text(tmp_path / "new.json", "{}")
        (tmp_path / "kept.json").write_text("old")
        os.chmod(tmp_path / "kept.json", 0o604)
        fileio.atomic_write_text(tmp_path / "kept.json", "new")
        save_pretrained(create_model(CvTConfig(**SMALL)), tmp_path / "ckpt")  # safetensors makes its own 0600 file
    finally:
        os.umask(old)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640  # 0666 minus the umask, as open() gives
    assert (tmp_path / "kept.json").stat().st_mode & 0o777 == 0o604
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ckpt").iterdir()} == {
        "config.json": 0o640, "model.safetensors": 0o640, "preprocessor_config.json": 0o640, "README.md": 0o640}


def test_output_errors_from_the_api(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(OutputError, match="adir: is a directory"):
        fileio.atomic_write_text(tmp_path / "adir", "x")
    with pytest.raises(OutputError, match="--weights-out .*: folder .* does not exist"):
        fileio.check_output(tmp_path / "no" / "x.pt", "--weights-out")
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(OutputError, match="pipe: not a regular file"):
        fileio.atomic_write_text(tmp_path / "pipe", "x")
    assert (tmp_path / "pipe").is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["adir", "pipe"]


CHILD_WRITER = """
import sys, time
from pathlib import Path
from torchcvt.fileio import atomic_save

def write(tmp):
    Path(tmp).write_bytes(b"half a checkpoint")
    Path(sys.argv[2]).write_text("writing")  # tell the test the temporary file exists
    time.sleep(3600)

atomic_save(write, sys.argv[1])
"""


def test_kill_during_a_write_keeps_the_file_and_the_next_write_clears_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "run" / "last.pt"
    target.parent.mkdir()
    target.write_bytes(b"the previous checkpoint")
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    child = subprocess.Popen([sys.executable, "-c", CHILD_WRITER, str(target), str(ready)], env=env)
    try:
        for _ in range(6000):  # generous: the child imports torch first
            if ready.exists() or child.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), "the writer never started"
        (temporary,) = target.parent.glob(".last.pt.*.tmp")
        # A live writer's temporary file is never removed by another writer in the same folder.
        monkeypatch.setattr(fileio, "_cleaned_folders", set())
        fileio.atomic_write_text(target.parent / "metrics.jsonl", "{}\n")
        assert temporary.exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert target.read_bytes() == b"the previous checkpoint"  # kill -9 mid-write: the old file, whole
    assert temporary.exists()
    # The next process to write into the folder removes what the dead writer left.
    monkeypatch.setattr(fileio, "_cleaned_folders", set())
    fileio.atomic_write_text(target.parent / "metrics.jsonl", "{}\n")
    assert not temporary.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.pt", "metrics.jsonl"]


def test_stale_temporaries_of_other_hosts_and_old_versions_go_by_age(tmp_path):
    other_host = tmp_path / ".a.pt.123-0badf00d-abcdef.tmp"  # another host (or PID namespace): PID means nothing here
    old_style = tmp_path / ".b.json.k2j4h5g6.tmp"  # mkstemp's name, before the PID was in it
    user_file = tmp_path / ".notes.tmp"  # not ours: never touched
    for path in (other_host, old_style, user_file):
        path.write_text("x")
    fileio.remove_stale_temporaries(tmp_path)
    fileio._remove_legacy_temporaries(tmp_path / "b.json")
    assert other_host.exists() and old_style.exists()  # fresh: their writers may be alive
    day_ago = time.time() - fileio.STALE_AFTER_S - 60
    for path in (other_host, old_style, user_file):
        os.utime(path, (day_ago, day_ago))
    assert fileio.remove_stale_temporaries(tmp_path) == [other_host]
    fileio._remove_legacy_temporaries(tmp_path / "b.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp"]


FULL_DISK_WRITES = """
import sys, torch
from pathlib import Path
from torchcvt import create_model, save_pretrained
from torchcvt.config import CvTConfig
from torchcvt.errors import DiskFullError
from torchcvt.fileio import atomic_save, atomic_write_text

folder = Path(sys.argv[1])
model = create_model(CvTConfig(**%r))
writes = {
    "safetensors": lambda: save_pretrained(model, folder),
    "torch.save": lambda: atomic_save(lambda tmp: torch.save(model.state_dict(), tmp), folder / "last.pt"),
    "text": lambda: atomic_write_text(folder / "metrics.jsonl", "x" * 1_000_000),
}
for name, write in writes.items():
    try:
        write()
        print(name, "wrote")
    except DiskFullError as exc:
        print(name, exc)
""" % (SMALL,)

FULL_DISK_SCRIPT = """
set -e
mount -t tmpfs -o size=256k tmpfs "$1"
for f in att.png model.safetensors last.pt metrics.jsonl; do echo "earlier $f" > "$1/$f"; done
head -c 1000000 /dev/zero > "$1/filler" 2>/dev/null || true  # fill it to the last block
"$2" -c "$3" "$1"
set +e
"$2" -m torchcvt attention "$4" --weights "$5" --output "$1/att.png"
echo "exit $?"
ls -a "$1"
for f in att.png model.safetensors last.pt metrics.jsonl; do cat "$1/$f"; done
"""


def test_full_disk_in_a_real_process(fx, tmp_path):
    """Writers that do their own I/O (safetensors, which also renames its own temporary file; torch.save;
    matplotlib under `cvt attention`) on a full file system, a private tmpfs: one line, files intact."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -rm (user and mount namespaces) to mount a small file system")
    mount = tmp_path / "small"
    mount.mkdir()
    env = {**os.environ, "PYTHONPATH": str(SRC), "MPLCONFIGDIR": str(tmp_path / "mpl")}
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", FULL_DISK_SCRIPT, "sh", str(mount), sys.executable, FULL_DISK_WRITES,
         str(fx / "ok.png"), str(fx / "ckpt")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()

    def message(name: str) -> str:
        return (f"no space left on device writing {mount}/{name}; the previous {name} is intact "
                "(free some space and run again)")

    assert out[:3] == [f"safetensors {message('model.safetensors')}", f"torch.save {message('last.pt')}",
                       f"text {message('metrics.jsonl')}"]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {message('att.png')}"  # after the note on its 1x1 grid
    assert "Traceback" not in proc.stderr
    assert out[3] == "exit 1"
    listing, contents = out[4:-4], out[-4:]
    assert sorted(listing) == [".", "..", "att.png", "filler", "last.pt", "metrics.jsonl", "model.safetensors"]
    assert contents == ["earlier att.png", "earlier model.safetensors", "earlier last.pt", "earlier metrics.jsonl"]


# ---------------------------------------------------------------------------------- JSON, opsets
def test_json_output_is_strict_even_with_nan_scores(fx, workspace, capsys):
    def strict(text: str):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))

    rc, out, err = run_cli(capsys, [P, str(fx / "ok.png"), "--weights", str(fx / "nan.safetensors"),
                                    "--allow-nonfinite-weights", "--format", "json"])
    assert rc == 0, err
    assert [e["score"] for e in strict(out)["top_k"]] == [None, None, None]
    rc, out, err = run_cli(capsys, [E, "--weights", str(fx / "nan.safetensors"), "--allow-nonfinite-weights",
                                    "--data", str(fx / "data"), "--val-fraction", "0.5", "--format", "json",
                                    "--output", str(workspace / "out" / "cm.png")])
    assert rc == 0, err
    assert strict(out.strip().splitlines()[-1])["loss"] is None


def test_opsets_outside_the_range_are_what_the_exporter_gets_wrong(tmp_path):
    """The measurement behind ONNX_OPSETS, repeated on this torch: just below the range the exporter
    writes another opset than asked; at the top of the range it writes the one asked for (the bottom,
    18, is exported by tests/test_export.py's command-line test)."""
    import warnings

    model = CvT(config=CvTConfig(**SMALL)).eval()
    x = torch.randn(1, 3, 32, 32)
    written = {}
    for opset in (ONNX_OPSETS.start - 1, ONNX_OPSETS.stop - 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (x,), None, dynamo=True, opset_version=opset, verbose=False)
        program.save(str(tmp_path / f"{opset}.onnx"), external_data=False)
        written[opset] = onnx_opset(tmp_path / f"{opset}.onnx")
    low, high = ONNX_OPSETS.start, ONNX_OPSETS.stop - 1
    assert written[high] == high and written[low - 1] != low - 1


# ----------------------------------------------------------------------- interop and pictures
def test_save_pretrained_warns_exactly_when_transformers_cannot_build_the_layout(tmp_path, caplog):
    from transformers import CvtConfig, CvtForImageClassification

    short = dict(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 1, 2), num_classes=3, image_size=32)
    with pytest.raises(IndexError):  # the reference: transformers' own CvtStage
        CvtForImageClassification(CvtConfig(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 1, 2], num_labels=3))
    CvtForImageClassification(CvtConfig(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], num_labels=3))
    assert transformers_incompatibilities(CvTConfig(**SMALL)) == []
    with caplog.at_level(logging.WARNING, logger="torchcvt"):
        save_pretrained(create_model(CvTConfig(**SMALL)), tmp_path / "fine")
        assert not caplog.records
        save_pretrained(create_model(CvTConfig(**short)), tmp_path / "short")
    (record,) = caplog.records
    assert "\n" not in record.getMessage()
    assert "transformers cannot build its layout: depth [1, 1, 2] has depth[i] <= i at stage(s) [1, 2]" in record.getMessage()


def test_constant_maps_are_said_not_drawn_as_speckle(fx, workspace, capsys):
    # A 1x1 key grid: every head's map is one probability; bilinear upsampling leaves float rounding
    # (~1e-8) that scaling to 0..1 would blow up into speckle.
    flat = torch.full((2, 7, 7), 0.02) + torch.randn(2, 7, 7) * 1e-9
    varied = torch.rand(1, 7, 7)
    maps = torch.cat([flat, varied])
    assert constant_maps(maps).tolist() == [True, True, False]
    up = upsample(maps, (64, 64))
    assert up[:2].abs().max() == 0 and up[2].min() == 0 and up[2].max() == 1
    out = workspace / "out" / "att.png"
    rc, printed, err = run_cli(capsys, [A, str(fx / "ok.png"), "--weights", str(fx / "ckpt"), "--output", str(out)])
    assert rc == 0, err
    assert err.startswith("note: every head's map is constant (1x1 key grid at 32x32 input")
    assert Image.open(out).size == (1000, 500)
