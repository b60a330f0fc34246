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
    """Install the filter on the libraries' handlers and the root's; Python warnings once.

    Call after the libraries are imported: diffusers and transformers attach their own
    handlers (and reset their levels) on import.
    """
    once = OncePerMessage()
    for name in (*LIBRARIES, ""):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, OncePerMessage) for f in handler.filters):
                handler.addFilter(once)
    warnings.simplefilter("once")
    return once
