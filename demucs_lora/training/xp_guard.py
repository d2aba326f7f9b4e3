"""One XP, one writer; workers die with their launcher; preemption keeps the work.

- `XPLock`: an exclusive ``flock`` on ``XP/.lock`` held by the process that writes the XP
  (rank 0) for as long as it runs; a second run of the same XP is refused with the pid
  and host of the holder. The kernel drops the lock when its holder dies (even kill -9),
  so a requeued job or a rerun after a crash takes it again.
- `die_with_launcher`: DDP workers ask the kernel for SIGKILL when their parent (the
  ``dora run -d`` launcher, torchrun's agent, slurmstepd) dies, instead of training on.
- `StopSignals`: SIGTERM / SIGUSR1 (Slurm preemption, `scancel --signal`) and submitit's
  own signal set a flag; the solver stops at the next step boundary, writes a checkpoint
  that resumes exactly there, and `exit` leaves with 128 + signal (or hands over to
  submitit's handler, which requeues the job).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import socket
import sys
import time
import typing as tp
from pathlib import Path

from demucs_lora.core.errors import XPBusy

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class XPLock:
    """Exclusive, non-blocking writer lock on an XP folder (a context manager)."""

    def __init__(self, folder: tp.Union[str, Path]):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: tp.Optional[int] = None

    def acquire(self) -> "XPLock":
        import fcntl
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise XPBusy(f"XP {self.folder.name} is already being trained by "
                         f"{holder or 'another process'} (it holds {self.path}): two runs "
                         "would interleave train.log and overwrite each other's "
                         "checkpoints. Wait for it to finish, or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "XPLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def die_with_launcher() -> bool:
    """In a DDP worker (WORLD_SIZE > 1), get SIGKILLed when the parent process dies.
    Returns True when armed (Linux only)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent or parent == 1:  # the launcher died before prctl
        os._exit(1)
    return True


_ACTIVE: tp.List["StopSignals"] = []


def active_stop_signals() -> tp.Optional["StopSignals"]:
    """The StopSignals installed by the entry point (train.main), if any."""
    return _ACTIVE[-1] if _ACTIVE else None


class StopSignals:
    """Defer SIGTERM / SIGUSR1 (and submitit's SIGUSR2 handler) to a step boundary."""

    def __init__(self, names: tp.Sequence[str] = ("SIGTERM", "SIGUSR1", "SIGUSR2")):
        self.signals = [getattr(signal, n) for n in names if hasattr(signal, n)]
        self.received: tp.Optional[int] = None
        self._previous: tp.Dict[int, tp.Any] = {}
        self.installed = False

    def install(self) -> "StopSignals":
        import threading
        if self.installed or threading.current_thread() is not threading.main_thread():
            return self
        self.installed = True
        _ACTIVE.append(self)
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if sig == getattr(signal, "SIGUSR2", None) and not callable(previous):
                continue  # only submitit's handler is worth deferring; default: leave it
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second signal: no more waiting
            self.restore()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        logger.warning("Received %s: stopping at the next step boundary with a checkpoint "
                       "(send it again to stop at once)", signal.Signals(signum).name)
        self.received = signum

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self.installed = False

    @property
    def requested(self) -> bool:
        return self.received is not None

    def exit(self) -> tp.NoReturn:
        """After the checkpoint: hand over to submitit's handler if there was one (it
        requeues), else exit with 128 + signal like an unhandled signal would."""
        signum = int(self.received or signal.SIGTERM)
        previous = self._previous.get(signum)
        self.restore()
        if callable(previous):
            previous(signum, None)
        logging.shutdown()
        sys.exit(128 + signum)
