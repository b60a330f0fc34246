"""The library's folders are its layers: imports point down only, and nothing imports in a circle.

    toyworld/  ->  evaluate/  ->  train/  ->  render/  ->  method/  ->  base (config, models, ...)

train/ may render (validation images, class images); render/ never imports train/; the
method's math imports no loop, pipeline or file code. The graph is read from the source (ast),
so an import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = "attn_utils"
LAYERS = {"base": 0, "method": 1, "render": 2, "train": 3, "evaluate": 4, "toyworld": 5}
# The method's math may use only these base modules (no run folder, no model loading).
METHOD_MAY_USE = {"attn_utils.config"}
CLIS = {"train_attndreambooth": "train", "inference": "render", "evaluate": "evaluate"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    """'method', 'render', ... for attn_utils.<layer>.x; 'base' for attn_utils.x."""
    if module in CLIS:
        return CLIS[module]
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "base"


def imports_of(source: str, me: str, is_package: bool, modules: set[str]) -> set[str]:
    """The project modules that module `me` imports (relative imports and packages resolved)."""
    package = me if is_package else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in modules:  # attn_utils.train.x.y -> attn_utils.train.x
                n = n.rpartition(".")[0]
            if n and n != me:
                found.add(n)
    return found


def project_graph() -> dict[str, set[str]]:
    files = sorted((ROOT / PACKAGE).rglob("*.py")) + [ROOT / f"{c}.py" for c in CLIS]
    modules = {module_name(p): p for p in files}
    return {
        m: imports_of(p.read_text(), m, p.name == "__init__.py", set(modules))
        for m, p in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if state.get(d) is None and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if state.get(m) is None and (c := visit(m)):
            return c
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, deps in graph.items():
        for d in deps:
            if d == PACKAGE or d.count(".") == 1 and d.split(".")[1] in LAYERS:
                continue  # a package itself (its __init__ imports nothing)
            lm, ld = layer(m), layer(d)
            if LAYERS[ld] > LAYERS[lm]:
                bad.append(f"{m} ({lm}) imports {d} ({ld})")
            if lm == "method" and ld == "base" and d not in METHOD_MAY_USE:
                bad.append(f"{m} (method) imports {d}: the math uses no files or models")
            if d in CLIS.keys():
                bad.append(f"{m} imports the CLI {d}")
    return sorted(bad)


def test_every_library_module_sits_in_a_layer_folder_or_the_base():
    graph = project_graph()
    packages = {f"{PACKAGE}.{name}" for name in LAYERS}
    base = sorted(
        m for m in graph if layer(m) == "base" and m.startswith(PACKAGE + ".") and m not in packages
    )
    assert set(base) <= {f"{PACKAGE}.{n}" for n in BASE_MODULES}, base
    for name in LAYERS:
        if name != "base":
            assert (ROOT / PACKAGE / name / "__init__.py").is_file(), name


BASE_MODULES = {
    "config",
    "run_flags",
    "models",
    "model_defaults",
    "runfiles",
    "images",
    "argparsing",
    "quiet",
    "tiny",
    "families",
    "sdxl",
}


def test_no_import_cycle_anywhere():
    assert find_cycle(project_graph()) is None


def test_imports_point_down_the_layers_only():
    assert upward_imports(project_graph()) == []


def test_the_checks_fail_on_an_upward_import_and_on_a_circle():
    graph = {k: set(v) for k, v in project_graph().items()}
    graph["attn_utils.method.capture"].add("attn_utils.train.trainer")
    assert upward_imports(graph) == [
        "attn_utils.method.capture (method) imports attn_utils.train.trainer (train)"
    ]
    assert find_cycle(graph) is not None  # the trainer imports capture: now a circle
    render = {k: set(v) for k, v in project_graph().items()}
    render["attn_utils.render.export"].add("attn_utils.train.methods")
    assert any("render.export" in b for b in upward_imports(render))


@pytest.mark.parametrize(
    "source",
    ["from ..train import trainer", "from ..train.trainer import Trainer",
     "import attn_utils.train.trainer as t", "from attn_utils.train import trainer"],
)  # fmt: skip
def test_the_ast_reader_resolves_relative_and_absolute_imports(source):
    modules = set(project_graph())
    found = imports_of(source, "attn_utils.method.capture", False, modules)
    assert "attn_utils.train.trainer" in found and "attn_utils.method.capture" not in found


def _loaded_after_importing(modules: list[str]) -> set[str]:
    """The attn_utils modules a fresh interpreter holds after importing `modules`."""
    code = (
        "import sys, importlib\n"
        "for m in sys.argv[1:]: importlib.import_module(m)\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith('attn_utils.'))))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *modules], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return set(r.stdout.strip().split(","))


def _layer_modules(name: str) -> list[str]:
    return [m for m in project_graph() if m.startswith(f"{PACKAGE}.{name}.")]


def test_rendering_and_the_math_load_no_training_code_at_run_time():
    """What the ast graph says, seen in a real interpreter: rendering (and inference.py) loads
    nothing of train/; the math loads no pipeline, loop, run folder or model loading."""
    loaded = _loaded_after_importing(["inference", *_layer_modules("render")])
    assert not {m for m in loaded if m.startswith(f"{PACKAGE}.train")}
    loaded = _loaded_after_importing(_layer_modules("method"))
    # attn_utils/__init__.py installs a log filter (quiet.py) before anything imports transformers
    allowed = {f"{PACKAGE}.method", *_layer_modules("method"), *METHOD_MAY_USE, f"{PACKAGE}.quiet"}
    assert loaded <= allowed, sorted(loaded - allowed)
