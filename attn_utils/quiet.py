"""Third-party warnings at most once each, so they do not bury the progress bars.

diffusers, for one, warns about fp32 modules every time the VAE changes dtype (around each
validation): 13 copies in one paper-recipe run. The first copy is still shown.
"""

from __future__ import annotations

import logging
import warnings

LIBRARIES = ("diffusers", "transformers", "accelerate", "huggingface_hub", "torch")
# Warnings of the libraries about the libraries, which no flag of ours can act on. Each one
# is matched by its text, so a new warning still shows. The same list is in pyproject.toml's
# pytest filterwarnings.
HARMLESS = (
    # diffusers' schedulers call np.array() on a torch tensor; numpy 2 asks torch for copy=
    (DeprecationWarning, r"__array__ implementation doesn't accept a copy keyword"),
    # diffusers passes huggingface_hub an argument it has deprecated, on every Hub load
    (UserWarning, r"The `local_dir_use_symlinks` argument is deprecated"),
)
TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"


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
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning):
        warnings.filterwarnings("ignore", category=category)  # Python's defaults, kept
    for category, message in HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category)
    return once


class _NoTorchvisionFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TORCHVISION_FALLBACK not in record.getMessage()


def hide_torchvision_fallback_notice() -> None:
    """transformers says so when it picks an image processor's PIL version for lack of
    torchvision. We never use its processors (pipelines get none; the metrics preprocess
    with our own code, docs/evaluation.md), so the notice would only alarm. The filter sits on
    the logger that emits it, set before transformers is imported, and drops that text only.
    """
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _NoTorchvisionFallbackNotice) for f in logger.filters):
        logger.addFilter(_NoTorchvisionFallbackNotice())
