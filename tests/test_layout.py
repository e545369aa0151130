"""The package's layout rules (docs/design.md), checked on the source itself.

- no module over 500 lines; train.py at most 450, its ``train()`` at most 120;
- no import cycle between torchcvt modules, lazy (function-level) imports included;
- private torch APIs (``torch._C``, ``torch.ops.mkldnn``) referenced from the fast-path module alone;
- the public hub ids written in the registry module alone;
- model.py imports only the config (and errors); checkpoint.py imports neither the model nor the registry;
- every declared runtime dependency is imported somewhere in the package.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "torchcvt"
MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def torchcvt_imports(path: Path) -> set[str]:
    """torchcvt modules that ``path`` imports anywhere in the file (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("torchcvt")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("torchcvt"):
                continue
            # `from . import augment` names a submodule; `from .config import X` names the module
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if any(module_name(p) == candidate for p in MODULES) else target)
    return {m for m in found if m != me}


GRAPH = {module_name(p): torchcvt_imports(p) for p in MODULES}


def test_no_module_over_500_lines():
    long = {p.name: n for p in MODULES if (n := len(p.read_text().splitlines())) > 500}
    assert not long


def test_train_loop_reads_in_one_sitting():
    source = (PACKAGE / "train.py").read_text()
    assert len(source.splitlines()) <= 450
    fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert fn.end_lineno - fn.lineno + 1 <= 120


def test_no_import_cycles():
    # The package's __init__ re-exports everything; a module importing `torchcvt` itself is the only
    # edge into it, and such edges are not allowed either (they would make a cycle through __init__).
    graph = {m: {t for t in deps if t in GRAPH} for m, deps in GRAPH.items()}
    into_init = sorted(m for m, deps in graph.items() if "torchcvt" in deps and m != "torchcvt")
    assert not into_init, f"modules importing the package root: {into_init}"
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt == "torchcvt" or (nxt.startswith(node + ".") and node != "torchcvt"):
                continue  # a package importing its own submodules is not a cycle
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for m in graph:
        if m != "torchcvt" and m not in state:
            visit(m, [m])
    assert not cycles


def test_model_imports_only_the_config():
    assert GRAPH["torchcvt.model"] <= {"torchcvt.config", "torchcvt.errors"}


def test_checkpoint_is_format_conversion_only():
    assert not GRAPH["torchcvt.checkpoint"] & {"torchcvt.model", "torchcvt.pretrained"}


# Backend-private ops (torch.ops.mkldnn, ...) and torch internals; ATen ops (torch.ops.aten) are public.
PRIVATE_TORCH = re.compile(r"torch\._C\b|torch\.ops\.(?!aten\.)|torch\._inductor|torch\._dynamo")


def test_private_torch_apis_live_in_the_fast_path_module():
    users = sorted(p.name for p in MODULES if PRIVATE_TORCH.search(p.read_text()))
    assert users == ["fastpath.py"]


def test_public_hub_ids_written_in_the_registry_alone():
    users = sorted(p.name for p in MODULES if re.search(r"microsoft/cvt-", p.read_text()))
    assert users == ["pretrained.py"]


# distribution name -> import name, where they differ
_IMPORT_NAMES = {"pillow": "PIL", "scikit-learn": "sklearn", "huggingface_hub": "huggingface_hub"}


def test_every_declared_runtime_dependency_is_imported():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].strip().lower() for d in project["dependencies"]]
    imported: set[str] = set()
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    unused = [n for n in names if _IMPORT_NAMES.get(n, n.replace("-", "_")) not in imported]
    assert not unused


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_every_module_says_what_it_owns(path):
    assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no module docstring"
