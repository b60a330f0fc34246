"""Write docs/cli.md, every flag of the three CLIs, from their parsers (so it cannot drift).

python docs/make_cli_md.py          rewrite docs/cli.md
python docs/make_cli_md.py --check  exit 1 if docs/cli.md is not current
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "cli.md"


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    sys.path.insert(0, str(ROOT))
    import evaluate
    import inference
    import train_attndreambooth

    return [
        ("train_attndreambooth.py", train_attndreambooth.build_parser()),
        ("inference.py", inference.build_parser()),
        ("evaluate.py", evaluate.build_parser()),
        ("evaluate.py study", evaluate.build_study_parser()),
    ]


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.default in (None, argparse.SUPPRESS) or action.nargs == 0 and not action.default:
        return ""
    return f"`{action.default}`"


def _flag(action: argparse.Action) -> str:
    names = ", ".join(f"`{s}`" for s in action.option_strings)
    if action.choices:
        names += " " + "\\|".join(str(c) for c in action.choices)
    return names


def render() -> str:
    lines = [
        "# Command-line reference",
        "",
        "Generated from the parsers by `python docs/make_cli_md.py`; a test fails when it is "
        "out of date. `--help` on each command shows the same, grouped the same way.",
        "",
    ]
    for name, parser in _parsers():
        lines += [f"## `{name}`", "", _cell(parser.description or ""), ""]
        for group in parser._action_groups:
            actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
            if not actions:
                continue
            lines += [f"### {group.title}", ""]
            if group.description:
                lines += [_cell(group.description), ""]
            lines += ["| flag | default | meaning |", "|---|---|---|"]
            for a in actions:
                help_ = (a.help or "") % {"default": a.default} if a.help else ""
                lines.append(f"| {_flag(a)} | {_default(a)} | {_cell(help_)} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ns = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ns.add_argument("--check", action="store_true", help="only compare with docs/cli.md")
    args = ns.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.is_file() else ""
        if current != text:
            print(f"{OUT} is out of date: run python docs/make_cli_md.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
