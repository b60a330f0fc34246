"""The documentation: the flag reference is current, and nothing points outside the repo."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT

TEXT = (".md", ".py", ".sh", ".toml", ".yaml", ".txt", ".json")


def _tracked_text_files() -> list:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    files = [ROOT / f for f in out.stdout.splitlines()]
    others = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True)  # fmt: skip
    files += [ROOT / f for f in others.stdout.splitlines()]
    return [f for f in files if f.suffix in TEXT and f.is_file()]


def test_cli_reference_is_generated_from_the_current_parsers():
    r = subprocess.run([sys.executable, "docs/make_cli_md.py", "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr + " (run: python docs/make_cli_md.py)"


def test_the_check_fails_on_a_stale_reference(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import make_cli_md
    finally:
        sys.path.pop(0)
    stale = tmp_path / "cli.md"
    stale.write_text(make_cli_md.render().replace("--resolution", "--resolutoin"))
    monkeypatch.setattr(make_cli_md, "OUT", stale)
    assert make_cli_md.main(["--check"]) == 1
    stale.write_text(make_cli_md.render())
    assert make_cli_md.main(["--check"]) == 0


def test_nothing_points_outside_the_repository():
    outside = re.compile(r"\.\./shared|\bSPEC\.md\b|/work/")
    me = ROOT / "tests" / "test_docs.py"
    bad = [
        f"{f.relative_to(ROOT)}:{n}"
        for f in _tracked_text_files()
        if f != me
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert bad == []


def test_every_relative_link_in_the_docs_resolves():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for f in _tracked_text_files():
        if f.suffix != ".md":
            continue
        for target in link.findall(f.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (f.parent / target).exists():
                broken.append(f"{f.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_the_readme_stays_a_page_of_commands_and_links():
    """Details live in docs/; the README grew to 8.6k characters once by repeating them."""
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 6500, f"README.md is {len(text)} characters; move details to docs/"
    assert "    bash bash_script/test.sh\n" in text  # the second of the two commands
