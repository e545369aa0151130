"""Faults a training run must survive, each checked against an uninterrupted reference run (the
``digits_run`` fixture) or against hashes of what was there before:

* kill -9 and SIGINT/SIGTERM at random moments: a signal stops the run after the step it arrived in,
  with a resumable checkpoint and exit status 130/143, and every resumed run ends byte-identical;
* run folders: a new run refuses a folder that holds a run or is in use (naming the process), bad
  ``--output`` folders are one line, ``--overwrite`` deletes only a run's own files;
* a full disk while checkpointing, a resume whose classes changed, extending a finished run.

Each fault asserts its one-line message (no traceback) and that nothing the user had changed. The
longest cases are marked slow (``pytest -m slow``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from torchcvt import cli
from torchcvt.distributed import Dist
from torchcvt.optimization import build_optimizer, follow_schedule, lr_at
from torchcvt.run_control import RunControl
from torchcvt.fileio import is_disk_full
from torchcvt.runs import LOCK_FILE, RUN_FILES
from torchcvt.train_state import EpochMeter

from conftest import DIGITS_RUN, cvt_train, image_folder, read_metrics

TRAIN = [sys.executable, "-m", "torchcvt", "train"]
SHORT = ("--epochs", "1", "--max-steps", "2")  # a run of two steps, for tests that need some run


@pytest.fixture(autouse=True)
def torch_state():
    """In-process runs set torch's threads, its global RNG and maybe deterministic mode: restore them."""
    threads, rng, deterministic = torch.get_num_threads(), torch.get_rng_state(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)
    torch.use_deterministic_algorithms(deterministic)


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` except the lock file (it holds the PID of its last holder)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def one_line(text: str) -> str:
    assert text.count("\n") == 1 and "Traceback" not in text, text
    return text.strip()


def assert_same_run(run: Path, reference: Path) -> None:
    """The final model byte for byte, last.pt's weights and optimizer state, and the metrics but their timings."""
    assert (run / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    a, b = (torch.load(r / "last.pt", weights_only=True) for r in (run, reference))
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(state_a[i][k], state_b[i][k]) for i in state_b for k in state_b[i])
    timing = ("images_per_sec", "epoch_seconds")
    assert [{k: v for k, v in row.items() if k not in timing} for row in read_metrics(run)] == \
           [{k: v for k, v in row.items() if k not in timing} for row in read_metrics(reference)]


def start_training(*args: str, cwd: Path) -> subprocess.Popen:
    """``cvt train ARGS`` in its own process group (so a signal to the group reaches it as a Ctrl-C would)."""
    return subprocess.Popen([*TRAIN, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_checkpoint(run: Path, proc: subprocess.Popen, step: int) -> None:
    """Until ``run``/last.pt holds optimizer step ``step`` or later (the run must still be going)."""
    last, seen = run / "last.pt", None
    while proc.poll() is None:
        stamp = last.stat().st_mtime_ns if last.exists() else None
        if stamp is not None and stamp != seen:
            seen = stamp
            if torch.load(last, weights_only=True)["step"] >= step:  # renamed into place whole: never half a file
                return
        time.sleep(0.01)
    pytest.fail(f"the run ended before step {step}: {proc.communicate()}")


# ------------------------------------------------------------------------ kill -9 and signals
@pytest.mark.parametrize("case", [0, *(pytest.param(i, marks=pytest.mark.slow) for i in range(1, 5))])
def test_kill_9_at_a_random_moment_then_resume_is_byte_identical(case, digits_run, tmp_path):
    """Checkpoints every 0.3 s (--checkpoint-every-minutes 0.005) besides every 5 steps; killed at a
    random moment after a random step, wherever it is: mid-step, mid-write, in validation."""
    rng = random.Random(case)
    proc = start_training(*DIGITS_RUN, "--checkpoint-every-minutes", "0.005", "--output", "run", cwd=tmp_path)
    try:
        wait_for_checkpoint(tmp_path / "run", proc, rng.randint(1, 30))
        time.sleep(rng.uniform(0, 0.15))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    killed_at = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert 0 < killed_at["step"] < 44 and not (tmp_path / "run" / "model.safetensors").exists()

    out = cvt_train("--resume", "--output", "run", cwd=tmp_path).stdout  # the lock died with the process
    assert f"resuming {Path('run', 'last.pt')}: epoch {killed_at['epoch'] + 1}, step {killed_at['step']}" in out
    assert_same_run(tmp_path / "run", digits_run)


@pytest.mark.parametrize("case", [0, *(pytest.param(i, marks=pytest.mark.slow) for i in range(1, 3))])
def test_sigint_at_a_random_moment_stops_with_a_checkpoint_and_resumes_byte_identical(case, digits_run, tmp_path):
    """A Ctrl-C (SIGINT to the process group; case 0 with 2 DataLoader workers, which must ignore it):
    exit 130 with one line and a last.pt at the step it names."""
    rng = random.Random(100 + case)
    workers = ("--workers", "2") if case == 0 else ()
    proc = start_training(*DIGITS_RUN, *workers, "--output", "run", cwd=tmp_path)
    try:
        wait_for_checkpoint(tmp_path / "run", proc, rng.randint(5, 30))
        time.sleep(rng.uniform(0, 0.15))
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    stopped = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    run = Path("run")
    where = (f"epoch {stopped['epoch'] + 1}, step {stopped['epoch_step']} of 22" if stopped["epoch_step"]
             else f"the end of epoch {stopped['epoch']}")  # the signal came during validation
    assert proc.returncode == 130 and one_line(err) == (
        f"stopped by SIGINT after step {stopped['step']} ({where}); {run / 'last.pt'} holds it: "
        f"continue with cvt train --resume --output {run}")
    cvt_train("--resume", *workers, "--output", "run", cwd=tmp_path)
    assert_same_run(tmp_path / "run", digits_run)


@pytest.mark.parametrize("sig, at_step", [(signal.SIGINT, 1), (signal.SIGINT, 7), (signal.SIGTERM, 22)],
                         ids=["SIGINT-1", "SIGINT-7", "SIGTERM-22"])
def test_a_signal_stops_the_run_after_the_step_it_arrived_in(sig, at_step, digits_run, tmp_path, capsys, monkeypatch):
    """The signal is sent from inside step ``at_step`` (after its backward pass, before its optimizer
    step): the run finishes that step, writes last.pt at it and stops. Step 22 is an epoch's last:
    its validation is left to the resumed run, which ends byte-identical to the uninterrupted one."""
    calls = 0
    real_add = EpochMeter.add

    def add(self, *args):
        nonlocal calls
        calls += 1
        if calls == at_step:
            os.kill(os.getpid(), sig)
        real_add(self, *args)

    monkeypatch.setattr(EpochMeter, "add", add)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    run = tmp_path / "run"
    rc = cli.main(["train", *DIGITS_RUN, "--output", str(run)])
    assert rc == 128 + sig and one_line(capsys.readouterr().err) == (
        f"stopped by {sig.name} after step {at_step} (epoch 1, step {at_step} of 22); {run / 'last.pt'} holds it: "
        f"continue with cvt train --resume --output {run}")
    assert torch.load(run / "last.pt", weights_only=True)["step"] == at_step
    assert not (run / "metrics.jsonl").exists()  # no validation after the signal
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    if at_step == 22:
        monkeypatch.setattr(EpochMeter, "add", real_add)
        assert cli.main(["train", "--resume", "--output", str(run)]) == 0
        assert_same_run(run, digits_run)


def test_checkpoints_by_step_count_and_by_the_clock_and_a_signal_stops():
    now = 0.0
    control = RunControl(Dist(), every_steps=4, every_minutes=0.5, clock=lambda: now)
    handler = signal.getsignal(signal.SIGINT)
    with control:
        written = []
        for step in range(1, 10):
            now += 10.0  # 10 s a step
            decision = control.after_step(step)
            assert decision.stop == 0
            if decision.checkpoint:
                control.saved()
                written.append(step)
        # By hand: 30 s after the last write (steps 3, 7) and every 4th step (4, 8), which restarts the clock.
        assert written == [3, 4, 7, 8]
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert control.after_step(10) == type(decision)(checkpoint=True, stop=signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.mark.slow
def test_torchrun_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path):
    """SIGTERM to rank 1 alone: both ranks stop after the same step (else a collective would hang),
    rank 0 writes last.pt, every rank exits 143 (torchrun reports them and exits 1); resumed under torchrun, the run ends byte-identical
    to an uninterrupted 2-process run."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "torchcvt", "train"]
    common = ("--epochs", "1", "--deterministic", "--checkpoint-every-steps", "3")
    subprocess.run([*torchrun, *common, "--output", "whole"], cwd=tmp_path, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen([*torchrun, *common, "--output", "run"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_checkpoint(tmp_path / "run", proc, 3)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        rank1 = next(int(pid) for pid in children if b"RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes())
        os.kill(rank1, signal.SIGTERM)
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    stopped = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert 3 <= stopped["step"] < 22 and not (tmp_path / "run" / "model.safetensors").exists()
    assert f"stopped by SIGTERM after step {stopped['step']} " in err, out + err
    assert err.count("exitcode  : 143") == 2 and proc.returncode == 1, err  # both ranks exit 143; torchrun itself 1
    subprocess.run([*torchrun, "--resume", "--output", "run"], cwd=tmp_path, check=True, capture_output=True, timeout=600)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------- run folders
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-step run (copy it before changing it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", *SHORT, "--output", str(run)]) == 0
    return run


@pytest.fixture
def finished_run(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def test_a_new_run_refuses_a_folder_that_holds_a_run(finished_run, capsys):
    (finished_run / "notes.txt").write_text("mine")
    before = file_hashes(finished_run)
    capsys.readouterr()
    for options in ((), ("--lr", "1e30")):  # docs/training.md's example of a NaN loss once wiped the demo
        assert cli.main(["train", *SHORT, *options, "--output", str(finished_run)]) == 1
        assert one_line(capsys.readouterr().err) == (
            f"error: --output {finished_run} holds a run ({', '.join(n for n in RUN_FILES if n != 'tensorboard')}): "  # no --tensorboard
            "continue it with --resume, "
            "or delete it and start over with --overwrite")
    assert file_hashes(finished_run) == before


def test_overwrite_deletes_only_the_files_of_the_run(finished_run, capsys):
    (finished_run / "notes.txt").write_text("mine")
    (finished_run / ".last.pt.x1y2.tmp").write_bytes(b"half a checkpoint of a killed writer")
    (finished_run / "tensorboard").mkdir()  # the old run's events: drawn with the new run's if they stayed
    (finished_run / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"old events")
    assert cli.main(["train", "--epochs", "1", "--max-steps", "1", "--overwrite", "--output", str(finished_run)]) == 0
    assert (finished_run / "notes.txt").read_text() == "mine" and not (finished_run / "tensorboard").exists()
    assert not (finished_run / ".last.pt.x1y2.tmp").exists()
    assert torch.load(finished_run / "last.pt", weights_only=True)["step"] == 1  # the new run's (the old one had 2)
    assert cli.main(["train", "--resume", "--overwrite", "--output", str(finished_run)]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"error: --resume and --overwrite exclude each other: --resume continues the run in --output {finished_run}, "
        "--overwrite deletes it")


def test_a_run_in_a_folder_in_use_refuses_naming_the_process_and_a_killed_run_leaves_no_lock(tmp_path, capsys):
    run = tmp_path / "run"
    first = start_training("--epochs", "50", "--output", str(run), cwd=tmp_path)
    try:
        while not (run / LOCK_FILE).is_file() or not (run / LOCK_FILE).read_text().startswith(f"{first.pid} "):
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        before = file_hashes(run)
        capsys.readouterr()
        for options in ((), ("--overwrite",), ("--resume",)):
            assert cli.main(["train", *SHORT, *options, "--output", str(run)]) == 1
            assert one_line(capsys.readouterr().err) == (
                f"error: --output {run} is in use by another cvt train (PID {first.pid} on {socket.gethostname()}); "
                "wait for it to end, or choose another --output")
        assert file_hashes(run) == before
    finally:
        first.kill()  # SIGKILL: the OS releases its lock
        first.communicate()
    assert cli.main(["train", *SHORT, "--overwrite", "--output", str(run)]) == 0


def _as_user_without_override() -> list[str]:
    """A command prefix under which root obeys file permissions (as every other user does)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root ignores file permissions and setpriv is not here to drop that capability")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]


@pytest.mark.parametrize("case", ["a file", "missing parent", "parent is a file"])
def test_an_output_that_cannot_be_a_run_folder_is_one_line_naming_it(case, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    output, expected = {
        "a file": (mine / "notes.txt", "is a file, not a folder: give a folder (a new run creates it)"),
        "missing parent": (mine / "missing" / "run", f": the folder {mine / 'missing'} does not exist (create it first, "
                                                      "or choose another --output)"),
        "parent is a file": (mine / "notes.txt" / "run", f": {mine / 'notes.txt'} is a file, not a folder"),
    }[case]
    before = file_hashes(mine)
    for options in ((), ("--overwrite",)):
        assert cli.main(["train", *SHORT, *options, "--output", str(output)]) == 1
        assert one_line(capsys.readouterr().err) == f"error: --output {output}{'' if expected[0] == ':' else ' '}{expected}"
    assert file_hashes(mine) == before and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_resume_without_a_run_is_one_line_and_creates_nothing(tmp_path, capsys):
    for output in (tmp_path / "run", tmp_path):  # a folder that does not exist, one without last.pt
        assert cli.main(["train", "--resume", "--output", str(output)]) == 1
        assert one_line(capsys.readouterr().err) == (
            f"error: --output {output}: no last.pt to resume from (start without --resume, or give the run's folder)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["read-only parent", "read-only folder"])
def test_a_read_only_output_is_one_line_naming_it(case, tmp_path):
    """As a subprocess: under root, without the capability that lets root write anywhere."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    output = mine / "run" if case == "read-only parent" else mine
    before = file_hashes(mine)
    prefix = _as_user_without_override()
    mine.chmod(0o555)
    try:
        proc = subprocess.run([*prefix, *TRAIN, *SHORT, "--output", str(output)], capture_output=True, text=True, timeout=600)
    finally:
        mine.chmod(0o755)
    assert proc.returncode == 1 and one_line(proc.stderr) == (
        f"error: --output {output} is not writable (Permission denied): choose a folder you can write to")
    assert file_hashes(mine) == before and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------- full disk, changed data
def test_full_disk_errors_are_recognised_as_torch_and_the_os_report_them():
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    reports = []
    for write in (lambda: torch.save({"w": torch.zeros(100_000)}, "/dev/full"),  # torch's writer: "unexpected pos"
                  lambda: open("/dev/full", "wb").write(b"x" * 100_000) and None):  # the OS: ENOSPC at flush
        with pytest.raises((RuntimeError, OSError)) as caught:
            write()
        reports.append(caught.value)
    assert "unexpected pos" in str(reports[0]) and all(is_disk_full(e) for e in reports)
    assert not is_disk_full(PermissionError(13, "Permission denied")) and not is_disk_full(RuntimeError("size mismatch"))


@pytest.mark.parametrize("failing", ["last.pt", "best.pt"])
def test_a_full_disk_while_checkpointing_is_one_line_and_the_previous_checkpoint_is_intact(failing, tmp_path, capsys,
                                                                                          monkeypatch):
    """A run of 8 steps writing last.pt every 2: last.pt fails at its third write (step 6), best.pt at its
    first (the end of the run's only epoch, after last.pt at step 8), each on /dev/full, a device that
    is always full. The run resumes from the checkpoint that was kept."""
    run = tmp_path / "run"
    real_save, writes, intact = torch.save, [], {}

    def save(obj, f, *args, **kwargs):
        writes.append(Path(f.name).name.split(".")[1])  # .last.pt.XXXX.tmp -> "last"
        if writes.count(failing.split(".")[0]) == (3 if failing == "last.pt" else 1):
            intact.update((name, h) for name, h in file_hashes(run).items() if not name.endswith(".tmp"))  # but this write's
            with open("/dev/full", "wb") as full:
                return real_save(obj, full, *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    rc = cli.main(["train", "--epochs", "1", "--max-steps", "8", "--checkpoint-every-steps", "2", "--output", str(run)])
    assert rc == 1 and one_line(capsys.readouterr().err) == (
        f"error: no space left on device writing {run / failing}; the previous checkpoint {run / 'last.pt'} is intact: "
        "free some space, then continue with --resume")
    assert file_hashes(run) == intact and not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert torch.load(run / "last.pt", weights_only=True)["step"] == (4 if failing == "last.pt" else 8)
    monkeypatch.setattr(torch, "save", real_save)
    assert cli.main(["train", "--resume", "--output", str(run)]) == 0 and (run / "best.pt").is_file()


def test_resume_after_the_data_gained_and_lost_classes_names_them(tmp_path, capsys):
    data = image_folder(tmp_path / "data", {"cat": 4, "dog": 4, "fox": 4})
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--model", "cvt-tiny", "--image-size", "32", "--epochs", "1",
                     "--batch-size", "3", "--val-fraction", "0.25", "--workers", "0", "--output", str(run)]) == 0
    (data / "dog").rename(data / "wolf")
    image_folder(data / "more", {"yak": 4})
    (data / "more" / "yak").rename(data / "yak")
    (data / "more").rmdir()
    before = file_hashes(tmp_path)
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--output", str(run)]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"error: --resume: the classes of {data} differ from those the run in {run} started with: new wolf, yak; "
        f"missing dog (4 classes now, 3 then); resume with the original data, or fine-tune from it (--weights {run / 'last.pt'})")
    assert file_hashes(tmp_path) == before


# ----------------------------------------------------------------------------- extending a run
def test_resume_with_more_epochs_extends_the_run_as_if_started_with_them(digits_run, tmp_path, capsys):
    """One epoch, then --resume --epochs 2: the schedule is recomputed for 2 epochs. The first epoch is
    all warm-up, which does not depend on the length, so the result is byte-identical to the reference."""
    run = tmp_path / "run"
    assert cli.main(["train", "--epochs", "1", "--deterministic", "--checkpoint-every-steps", "5", "--output", str(run)]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--epochs", "2", "--output", str(run)]) == 0
    assert f"resuming {run / 'last.pt'}: epoch 2, step 22; the schedule is recomputed for 2 epochs (was 1)" in capsys.readouterr().out
    assert_same_run(run, digits_run)
    assert json.loads((run / "train_config.json").read_text())["epochs"] == 2
    before = file_hashes(run)
    assert cli.main(["train", "--resume", "--epochs", "1", "--output", str(run)]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"error: --epochs 1: the run in {run} has already completed 2 epochs; give more to extend it")
    assert file_hashes(run) == before


def test_an_extended_schedule_gives_every_later_step_the_rate_of_the_longer_run():
    class Net(torch.nn.Linear):
        def no_weight_decay(self) -> set[str]:
            return set()

    net = Net(2, 2)
    schedule = dict(lr=1.0, warmup_lr=0.1, min_lr=0.0, warmup_steps=10)
    optimizer, scheduler = build_optimizer(net, weight_decay=0.05, total_steps=50, device=torch.device("cpu"), **schedule)
    for _ in range(30):
        optimizer.step()
        scheduler.step()
    longer, longer_scheduler = build_optimizer(net, weight_decay=0.05, total_steps=100, device=torch.device("cpu"), **schedule)
    longer.load_state_dict(optimizer.state_dict())
    longer_scheduler.load_state_dict(scheduler.state_dict())
    assert longer.param_groups[0]["lr"] == pytest.approx(lr_at(30, total_steps=50, **schedule))  # the saved schedule's
    follow_schedule(longer_scheduler)
    assert [g["lr"] for g in longer.param_groups] == [lr_at(30, total_steps=100, **schedule)] * 2
    longer.step()
    longer_scheduler.step()
    assert [g["lr"] for g in longer.param_groups] == [lr_at(31, total_steps=100, **schedule)] * 2
