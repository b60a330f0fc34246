"""Third-party warnings at most once each; the project's own log records untouched."""

from __future__ import annotations

import io
import logging
import logging.handlers
import uuid

import diffusers  # noqa: F401 - installs its own handler on import

from attn_utils.quiet import third_party_warnings_once


def test_a_repeated_library_warning_is_shown_once_and_ours_always():
    third_party_warnings_once()
    third_party_warnings_once()  # idempotent: one filter per handler and logger
    handlers = logging.getLogger("diffusers").handlers  # diffusers' own stderr handler
    shown = io.StringIO()
    old = [h.setStream(shown) for h in handlers if type(h) is logging.StreamHandler]
    lib = logging.getLogger("diffusers")
    level = lib.level
    lib.setLevel(logging.WARNING)  # an in-process CLI call of another test may have raised it
    # messages of their own: the filter of an earlier call in this process has seen others
    fp32 = f"There are modules in AutoencoderKL that should be kept in float32 ({uuid.uuid4()})"
    other = f"a different message ({uuid.uuid4()})"
    try:
        # a module logger made after the call, as diffusers' lazy imports make them
        child = logging.getLogger("diffusers.models.made_later")
        for _ in range(3):  # what each VAE dtype change around a validation printed
            child.warning(fp32)
        child.warning(other)
        ours = logging.getLogger("attn_utils.render.renderer")
        seen = logging.handlers.BufferingHandler(10)
        ours.addHandler(seen)
        for _ in range(2):
            ours.warning("prompt without '{}'")
        ours.removeHandler(seen)
    finally:
        lib.setLevel(level)
        for h, stream in zip([h for h in handlers if type(h) is logging.StreamHandler], old):
            h.setStream(stream)
    assert shown.getvalue().splitlines() == [fp32, other]
    assert [r.getMessage() for r in seen.buffer] == ["prompt without '{}'"] * 2
