"""Checkpoints written without stalling the GPU: a host snapshot, then a background write.

A stage-3 checkpoint is ~10 GB (fp32 U-Net and AdamW moments). Written in the loop it stops
training for as long as the disk takes; here the loop only queues device-to-host copies into
reused pinned buffers and goes on, and one writer thread waits for the copies and writes.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator

import torch


class HostSnapshot:
    """Reusable host buffers for device tensors; pinned on CUDA so the copies run async."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Callable]:
        """(host copies, ready): call ready() before reading the copies (from any thread)."""
        out, events = {}, []
        for name, t in tensors.items():
            t = t.detach()
            if t.device.type == "cpu":  # the loop changes it in place: copy now
                out[name] = t.clone(memory_format=torch.contiguous_format)
                continue
            buf = self._buffers.get(name)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
                self._buffers[name] = buf
            buf.copy_(t, non_blocking=True)
            out[name] = buf
        if any(t.device.type == "cuda" for t in tensors.values()):
            event = torch.cuda.Event()
            event.record()  # after the copies on the current stream
            events.append(event)
        return out, lambda: [e.synchronize() for e in events]


class BackgroundWriter:
    """One write at a time in a non-daemon thread; its error surfaces at the next wait().

    Non-daemon: an exiting interpreter still finishes the write, so no checkpoint is lost
    half-way; the write itself is atomic (runfiles.write_dir_atomically).
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, fn: Callable[[], object]) -> None:
        """Wait for the previous write, then start fn() in the writer thread."""
        self.wait()

        def run() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the loop's thread
                self._error = e

        self._thread = threading.Thread(target=run, name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        """Block until the current write is on disk; raise what it raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


@contextlib.contextmanager
def finish_writes(writer: BackgroundWriter) -> Iterator[None]:
    """On every exit, wait for the write in flight: a crash still leaves its checkpoint.

    A write error is raised unless another exception is already on its way out.
    """
    try:
        yield
    finally:
        if sys.exc_info()[0] is None:
            writer.wait()
        else:
            with contextlib.suppress(BaseException):
                writer.wait()
