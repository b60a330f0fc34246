"""Emulate a second device on the CPU: project code that makes a tensor without a device fails.

On a GPU the models live on cuda while `torch.tensor(x)` lands on the CPU, and the first op
that mixes the two raises. Here the models stay on the CPU (so values are real), and every
tensor factory called from the project's own files without a `device=` is sent to the `meta`
device instead: mixing it with a model tensor raises just as CUDA does. Third-party code
(tokenizers, optimisers, diffusers) keeps its own defaults, as it would on a GPU machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

ROOT = Path(__file__).resolve().parents[1]
# The project's code as a user runs it: the library, the two CLIs and the benchmark.
PROJECT = tuple(
    str(p)
    for p in (
        ROOT / "attn_utils",
        ROOT / "bench",
        ROOT / "inference.py",
        ROOT / "train_attndreambooth.py",
        ROOT / "evaluate.py",
    )
)
FACTORIES = frozenset(_device_constructors())


class ForeignDefaultDevice(TorchFunctionMode):
    """Send device-less tensor factories called from project files to the `meta` device."""

    def __init__(self) -> None:
        super().__init__()
        self.redirected: list[str] = []  # "file:line func" of each redirected call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1)  # the Python frame that called the factory
            if caller.f_code.co_filename.startswith(PROJECT):
                kwargs["device"] = "meta"
                self.redirected.append(
                    f"{caller.f_code.co_filename}:{caller.f_lineno} {func.__name__}"
                )
        return func(*args, **kwargs)
