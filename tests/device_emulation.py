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

import torch
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
# torch.from_numpy always makes a CPU tensor. These functions decode images on the host by
# design (the loader / the metric model moves the batch to the device); anywhere else in
# project code a from_numpy tensor is sent to `meta` like a device-less factory's.
HOST_SIDE = {("data.py", "augment_with_crop"), ("metrics.py", "__call__")}
_REAL_GENERATOR, _REAL_FROM_NUMPY = torch.Generator, torch.from_numpy


def _project_caller(depth: int = 2):
    """The calling frame if it stands in a project file, else None."""
    frame = sys._getframe(depth)
    return frame if frame.f_code.co_filename.startswith(PROJECT) else None


def _where(frame, what: str) -> str:
    return f"{frame.f_code.co_filename}:{frame.f_lineno} {what}"


class ForeignDefaultDevice(TorchFunctionMode):
    """Send device-less tensor factories called from project files to the `meta` device.

    Also covers what no torch function mode sees: `torch.Generator()` without a device in
    project code is recorded (its draws would land on the CPU), and `torch.from_numpy`
    outside HOST_SIDE is sent to `meta`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.redirected: list[str] = []  # "file:line func" of each redirected call

    def __enter__(self):
        mode = self

        class _GeneratorMeta(type):
            def __instancecheck__(cls, obj):
                return isinstance(obj, _REAL_GENERATOR)

            def __call__(cls, *args, **kwargs):
                frame = _project_caller()
                if frame is not None and not args and kwargs.get("device") is None:
                    mode.redirected.append(_where(frame, "Generator"))
                return _REAL_GENERATOR(*args, **kwargs)

        class Generator(metaclass=_GeneratorMeta):
            pass

        def from_numpy(array):
            out, frame = _REAL_FROM_NUMPY(array), _project_caller()
            if frame is None:
                return out
            if (Path(frame.f_code.co_filename).name, frame.f_code.co_name) in HOST_SIDE:
                return out
            mode.redirected.append(_where(frame, "from_numpy"))
            return out.to("meta")

        torch.Generator, torch.from_numpy = Generator, from_numpy
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Generator, torch.from_numpy = _REAL_GENERATOR, _REAL_FROM_NUMPY
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1)  # the Python frame that called the factory
            if caller.f_code.co_filename.startswith(PROJECT):
                kwargs["device"] = "meta"
                self.redirected.append(_where(caller, func.__name__))
        return func(*args, **kwargs)
