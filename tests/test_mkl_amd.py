"""torchcvt/mkl_amd.py: MKL's Intel kernels on AMD CPUs through a shim loaded before torch.

The suite's own processes import torch first (conftest), so the shim is inactive in them; these tests
start fresh interpreters for the cases that depend on import order. The numbers are checked against
float64 products, not against a run without the shim.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from torchcvt import mkl_amd

import torch

AMD = mkl_amd._cpu_vendor() in mkl_amd.AMD_VENDORS and sys.platform == "linux"
COMPILER = any(shutil.which(c) for c in ("cc", "gcc", "clang"))
needs_amd = pytest.mark.skipif(not (AMD and COMPILER and torch.backends.mkl.is_available()),
                               reason="needs Linux on an AMD CPU, a C compiler and torch built with MKL")

CHILD = """
import {first}
import json, torch, torchcvt
from torchcvt import mkl_amd
g = torch.Generator().manual_seed(0)
a, b = torch.randn(300, 500, generator=g), torch.randn(500, 200, generator=g)
exact = a.double() @ b.double()
error = ((a @ b).double() - exact).abs().max().item() / exact.abs().max().item()
model = torchcvt.create_model("cvt-13", num_classes=10).eval()  # fast path and fused copy, float32
x = torch.randn(2, 3, 96, 96, generator=g)  # any size: kept small for the suite
with torch.inference_mode():
    ours = torchcvt.optimize_for_inference(model, backend="eager")(x).double()
    reference = torchcvt.remove_fast_path(model).double()(x.double())
model_error = (ours - reference).abs().max().item()
print(json.dumps({{"status": mkl_amd.status(), "active": mkl_amd.active(), "error": error, "model_error": model_error}}))
"""


def run_child(tmp_path: Path, first: str, **env: str) -> dict[str, object]:
    environment = dict(os.environ, TORCHCVT_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(Path(mkl_amd.__file__).parents[1]))
    environment.update({"TORCHCVT_MKL_INTEL_PATH": "1"} | env)  # conftest turns it off for the rest of the suite
    done = subprocess.run([sys.executable, "-c", CHILD.format(first=first)], env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_amd
def test_imported_first_mkl_runs_its_intel_kernels(tmp_path):
    result = run_child(tmp_path, "torchcvt")
    assert result["active"], result["status"]
    assert result["error"] < 1e-5  # float32 rounding, against float64
    assert result["model_error"] < 1e-4  # the eager backend's logits against the plain model in float64
    shim = mkl_amd.shim_path().name
    built = tmp_path / "cache" / "mkl" / shim
    assert built.is_file() and stat.S_IMODE(built.stat().st_mode) == 0o755
    assert stat.S_IMODE(built.parent.stat().st_mode) == 0o700
    assert [p.name for p in built.parent.iterdir()] == [shim]  # no temporary left behind
    first_build = built.stat().st_mtime_ns
    again = run_child(tmp_path, "torchcvt")
    assert again["active"] and built.stat().st_mtime_ns == first_build  # the file was reused, not compiled again


@needs_amd
def test_torch_imported_first_keeps_mkls_dispatch_and_says_why(tmp_path):
    result = run_child(tmp_path, "torch, torchcvt")
    assert not result["active"]
    assert "torch was imported before torchcvt" in result["status"]
    assert result["error"] < 1e-5


@needs_amd
def test_preloaded_shim_is_recognised(tmp_path):
    path = subprocess.run([sys.executable, "-c", "from torchcvt import mkl_amd; print(mkl_amd.build_shim())"], capture_output=True, text=True,
                          env=dict(os.environ, TORCHCVT_CACHE=str(tmp_path / "cache")), check=True).stdout.strip()
    result = run_child(tmp_path, "torch, torchcvt", LD_PRELOAD=path)
    assert result["active"], result["status"]


def test_off_switch(tmp_path):
    result = run_child(tmp_path, "torchcvt", TORCHCVT_MKL_INTEL_PATH="0")
    assert not result["active"] and "$TORCHCVT_MKL_INTEL_PATH=0" in result["status"]
    assert not (tmp_path / "cache").exists()  # nothing compiled


@pytest.fixture
def fresh_state(monkeypatch):
    """The module's state as before enable() ran; restored after the test."""
    for name, value in (("_library", None), ("_how", ""), ("_reason", "not tried")):
        monkeypatch.setattr(mkl_amd, name, value)


def test_not_applied_on_other_vendors(monkeypatch, fresh_state):
    monkeypatch.setattr(mkl_amd, "_cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(mkl_amd.sys, "platform", "linux")
    monkeypatch.setattr(mkl_amd.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("TORCHCVT_MKL_INTEL_PATH", raising=False)
    assert mkl_amd.enable() is False
    assert "GenuineIntel CPU, MKL dispatches on its own" in mkl_amd.status()


def test_without_a_compiler_the_reason_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHCVT_CACHE", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(mkl_amd.shutil, "which", lambda name: None)
    with pytest.raises(OSError, match="no C compiler"):
        mkl_amd.build_shim()
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []


@pytest.mark.skipif(not shutil.which("false"), reason="needs the false command")
def test_a_failed_compile_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHCVT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    with pytest.raises(OSError, match="false failed"):
        mkl_amd.build_shim()
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []  # the private folder, empty


@pytest.mark.skipif(not COMPILER, reason="needs a C compiler")
@pytest.mark.parametrize("plant", ["world-writable", "symlink"])
def test_a_file_others_could_have_written_is_never_loaded_but_rebuilt(tmp_path, monkeypatch, plant):
    monkeypatch.setenv("TORCHCVT_CACHE", str(tmp_path))
    planted = mkl_amd.shim_path()
    planted.parent.mkdir(parents=True, mode=0o700)
    elsewhere = tmp_path / "elsewhere.so"
    elsewhere.write_bytes(b"not a library")
    if plant == "symlink":
        planted.symlink_to(elsewhere)
    else:
        planted.write_bytes(b"not a library")
        planted.chmod(0o666)
    old_umask = os.umask(0)  # the rebuilt file is 0755 whatever the umask
    try:
        built = mkl_amd.build_shim()
    finally:
        os.umask(old_umask)
    assert built == planted and not built.is_symlink() and stat.S_IMODE(built.stat().st_mode) == 0o755
    assert built.read_bytes()[:4] == b"\x7fELF" and elsewhere.read_bytes() == b"not a library"


def test_a_cache_folder_others_can_write_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHCVT_CACHE", str(tmp_path))
    folder = mkl_amd.shim_path().parent
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    with pytest.raises(OSError, match="others cannot write; not loading a library from it"):
        mkl_amd.build_shim()


def test_a_cache_that_is_a_file_is_one_line_naming_it(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.write_text("a file, not a folder")
    monkeypatch.setenv("TORCHCVT_CACHE", str(cache))
    with pytest.raises(OSError, match=f"^cannot create the shim's folder {cache / 'mkl'}: "):
        mkl_amd.build_shim()
    assert cache.read_text() == "a file, not a folder"


def test_status_never_raises_and_a_missing_preload_is_ignored(tmp_path):
    missing = str(tmp_path / "mkl-intel-path-gone.so")  # the loader says it cannot preload it, and goes on
    result = run_child(tmp_path, "torch, torchcvt", LD_PRELOAD=missing)
    assert not result["active"] and "torch was imported before torchcvt" in result["status"]


def test_torchcvt_decides_before_anything_imports_torch(tmp_path):
    """On every platform: when torch is first imported, enable() has already run (or torch would be too late)."""
    probe = """
import importlib.abc, sys
seen = []
class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            module = sys.modules.get("torchcvt.mkl_amd")
            seen.append(module is not None and (module._library is not None or not module._reason.startswith("not tried")))
        return None
sys.meta_path.insert(0, Probe())
import torchcvt
print(seen)
"""
    environment = dict(os.environ, TORCHCVT_CACHE=str(tmp_path), PYTHONPATH=str(Path(mkl_amd.__file__).parents[1]))
    done = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[True]"


def test_a_resume_on_other_float32_kernels_says_it_will_not_be_byte_identical(monkeypatch):
    from torchcvt import train_state

    now = train_state.float_kernels("cpu")
    assert set(now) == {"torch", "device", "gemm", "mkl"} and now["mkl"] in ("intel kernels", "default dispatch")
    assert train_state.kernels_note({"kernels": dict(now)}, "cpu") == ""
    assert train_state.kernels_note({}, "cpu") == ""  # a checkpoint from before the record: nothing to compare
    monkeypatch.setattr(train_state, "gemm_engine", lambda: pytest.fail("a GPU run times no CPU GEMMs"))
    assert train_state.float_kernels("cuda") == {"torch": now["torch"], "device": "cuda"}
    monkeypatch.undo()
    other = "default dispatch" if now["mkl"] == "intel kernels" else "intel kernels"
    note = train_state.kernels_note({"kernels": {**now, "mkl": other}}, "cpu")
    assert note == f"; float32 kernels differ from the checkpoint's (mkl: {other} -> {now['mkl']}): not byte-identical to an uninterrupted run"
