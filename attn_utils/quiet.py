"""Third-party warnings at most once each, so they do not bury the progress bars.

diffusers, for one, warns about fp32 modules every time the VAE changes dtype (around each
validation): 13 copies in one paper-recipe run. The first copy is still shown.
"""

from __future__ import annotations

import logging
import warnings

LIBRARIES = ("diffusers", "transformers", "accelerate", "huggingface_hub", "torch")


class OncePerMessage(logging.Filter):
    """Pass a (logger, message) pair the first time only."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name.split(".")[0], record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def third_party_warnings_once() -> OncePerMessage:
    """Put one shared filter on the libraries' own handlers and loggers; Python warnings once.

    diffusers and transformers print through a handler of their own (no propagation), made
    on import: a filter there sees every module's records, even of modules imported later.
    Libraries without one get the filter on each logger that exists now. Other handlers
    (the root's, pytest's) are left alone, so the project's own records are never filtered.
    """
    once = OncePerMessage()

    def add(target) -> None:
        if not any(isinstance(f, OncePerMessage) for f in target.filters):
            target.addFilter(once)

    shared = set(logging.root.handlers)  # torch's logger, for one, may hold the root's
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        for handler in logger.handlers if not logger.propagate else []:
            if handler not in shared:
                add(handler)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.split(".")[0] in LIBRARIES:
            add(logger)
    warnings.simplefilter("once")
    return once
