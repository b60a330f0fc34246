"""environment.yaml (conda, pip section) declares what pyproject.toml declares."""

from __future__ import annotations

import re
import sys

from conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower()


def _env_pip_requirements() -> set[str]:
    """The '- name...' lines under 'pip:' in environment.yaml (comments dropped)."""
    lines = (ROOT / "environment.yaml").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "- pip:")
    indent = len(lines[start + 1]) - len(lines[start + 1].lstrip())
    reqs = set()
    for ln in lines[start + 1 :]:
        if ln.strip() and len(ln) - len(ln.lstrip()) < indent:
            break
        item = ln.split("#", 1)[0].strip()
        if item.startswith("- "):
            reqs.add(_norm(item[2:]))
    return reqs


def test_environment_yaml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_norm(r) for r in project["dependencies"]}
    wanted |= {_norm(r) for r in project["optional-dependencies"]["test"]}
    assert _env_pip_requirements() == wanted


def test_layers_inference_and_the_math_import_no_training_code():
    """Inference never imports the trainer's modules; the method's math imports no loop,
    pipeline or file code. Checked in a fresh interpreter, after importing each side."""
    import subprocess
    import sys

    from conftest import ROOT

    code = (
        "import sys, importlib\n"
        "mods = sys.argv[1].split(',')\n"
        "for m in mods: importlib.import_module(m)\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith('attn_utils.'))))\n"
    )
    training = {"attn_utils.trainer", "attn_utils.checkpoint", "attn_utils.data",
                "attn_utils.stages", "attn_utils.runtime", "attn_utils.loader",
                "attn_utils.prior", "attn_utils.methods"}  # fmt: skip
    sides = {
        "inference,attn_utils.render,attn_utils.export,attn_utils.heatmaps": training,
        "attn_utils.capture,attn_utils.losses,attn_utils.step,attn_utils.tokens": training
        | {"attn_utils.pipeline", "attn_utils.render", "attn_utils.runfiles"},
    }
    for mods, forbidden in sides.items():
        r = subprocess.run([sys.executable, "-c", code, mods], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        loaded = set(r.stdout.strip().split(","))
        assert not loaded & forbidden, (mods, sorted(loaded & forbidden))
