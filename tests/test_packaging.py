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
