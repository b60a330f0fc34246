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

    An unknown flag names the closest valid one instead of printing the usage, and is reported
    before missing required flags: a mistyped required flag is the likelier cause of both.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --resum must not mean --resume_from_...
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._given: list[str] = []

    def flags(self) -> list[str]:
        return [s for a in self._actions for s in a.option_strings if s.startswith("--")]

    def parse_known_args(
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """argparse's, remembering the command line so that error() can look for unknown flags."""
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def _unknown_flag(self, given: list[str]) -> str | None:
        """The first '--flag' of `given` that this parser does not know, or None."""
        known = set(self.flags())
        for arg in given:
            if arg == "--":  # what follows is positional
                return None
            name = arg.split("=", 1)[0]
            if name.startswith("--") and name not in known:
                return name
        return None

    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        flag = None
        if unknown:
            given = unknown.group(1).split()
            flag = next((g for g in given if g.startswith("-")), given[0]).split("=", 1)[0]
        elif message.startswith("the following arguments are required"):
            flag = self._unknown_flag(self._given)
        if flag is not None:
            close = closest_flag(flag, self.flags())
            hint = f"; did you mean {close}?" if close else f" (see {self.prog} --help)"
            message = f"{flag}: unknown flag{hint}"
        # "argument --a/--b: why" -> "--a: why", as every other error line of ours
        message = re.sub(r"^argument (--[^\s:/]+)(?:/[^\s:]+)?: ", r"\1: ", message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def closest_flag(typed: str, flags: list[str]) -> str | None:
    """The flag `typed` most likely meant: one it begins (the closest such), else difflib's."""

    def similarity(flag: str) -> float:
        return difflib.SequenceMatcher(None, typed, flag).ratio()

    # '--res' is a cut-short '--resolution', though '--repeats' shares more letters with it
    extended = [f for f in flags if f.startswith(typed)]
    if extended:
        return max(extended, key=similarity)
    close = difflib.get_close_matches(typed, flags, n=1, cutoff=0.6)
    return close[0] if close else None
