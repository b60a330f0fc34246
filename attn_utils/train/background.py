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
    """Reusable host buffers for device tensors; pinned on CUDA so the copies run async.

    The buffers are leased: take() refuses to overwrite them until release() says the
    write that reads them is done, so a checkpoint never mixes two steps' tensors.
    `reuse_cpu` sends CPU tensors through the same buffers (the tests' stand-in for CUDA).
    """

    def __init__(self, reuse_cpu: bool = False) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._reuse_cpu = reuse_cpu
        self._leased = threading.Event()

    def take(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Callable]:
        """(host copies, ready): call ready() before reading the copies (from any thread)."""
        if self._leased.is_set():
            raise RuntimeError("HostSnapshot.take: the last snapshot is still being written")
        out, events, reused = {}, [], False
        for name, t in tensors.items():
            t = t.detach()
            if t.device.type == "cpu" and not self._reuse_cpu:  # changed in place: copy now
                out[name] = t.clone(memory_format=torch.contiguous_format)
                continue
            buf = self._buffers.get(name)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                pin = t.device.type == "cuda"
                buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                self._buffers[name] = buf
            buf.copy_(t, non_blocking=True)
            out[name], reused = buf, True
        if reused:
            self._leased.set()
        if any(t.device.type == "cuda" for t in tensors.values()):
            event = torch.cuda.Event()
            event.record()  # after the copies on the current stream
            events.append(event)
        return out, lambda: [e.synchronize() for e in events]

    def release(self) -> None:
        """The copies of the last take() have been written: the buffers may be reused."""
        self._leased.clear()


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
