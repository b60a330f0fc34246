"""The command lines' parser: one-line errors that name the flag, every default in --help."""

from __future__ import annotations

import argparse
import copy
import difflib
import re
import sys
from typing import NoReturn


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default (where there is one to show); descriptions keep their line breaks."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shows_default(action):  # a flag without help text still
            action = copy.copy(action)  # shows its default
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not _shows_default(action):
            return text
        return f"{text} (default: %(default)s)"


def _shows_default(action: argparse.Action) -> bool:
    """A default worth printing: a value a flag that takes one starts from."""
    if action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
        return False
    return bool(action.option_strings)


class Parser(argparse.ArgumentParser):
    """argparse with allow_abbrev=False and errors of one line: 'error: --flag: why'.

    An unknown flag names the closest valid one instead of printing the usage.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --resum must not mean --resume_from_...
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def flags(self) -> list[str]:
        return [s for a in self._actions for s in a.option_strings if s.startswith("--")]

    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            given = unknown.group(1).split()
            flag = next((g for g in given if g.startswith("-")), given[0])
            flag = flag.split("=", 1)[0]
            close = difflib.get_close_matches(flag, self.flags(), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f" (see {self.prog} --help)"
            message = f"{flag}: unknown flag{hint}"
        # "argument --a/--b: why" -> "--a: why", as every other error line of ours
        message = re.sub(r"^argument (--[^\s:/]+)(?:/[^\s:]+)?: ", r"\1: ", message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
