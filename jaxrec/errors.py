"""User-facing errors. Every command-line entry point prints these as one `error: ...` line.

A `JaxrecError` is a problem the user can fix (bad config, bad data, a checkpoint that does not
fit): the message says what is wrong, where (file and line, config key, checkpoint path) and how
to fix it. Anything else escaping a command is a bug in jaxrec and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import warnings
from collections.abc import Iterator


class JaxrecError(ValueError):
    """Base class of the errors a user can act on."""


class ConfigError(JaxrecError):
    """A config key has a value jaxrec cannot honour, or is unknown; the message names the key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class ArchError(ConfigError):
    """An Arch (config section or a model directory's record) that jaxrec cannot build; `key`
    names the Arch key, e.g. `Arch.Head.name`."""


class SamplerConfigError(JaxrecError):
    """The PKSampler settings cannot work with this dataset; the message says how to fix them."""


class ImageDecodeError(JaxrecError):
    """An image file could not be read or decoded; the message names the file."""


class CheckpointMismatchError(JaxrecError):
    """A checkpoint does not fit the model/optimizer the config builds, or cannot be read."""


class ConfigChangedError(JaxrecError):
    """A resumed run was started with a config that differs from the run's saved config."""


class TrainingDivergedError(JaxrecError, FloatingPointError):
    """The loss or the gradient became NaN or infinite."""


class ModelDirError(JaxrecError):
    """A model directory is missing, malformed, or does not match what it claims to hold."""


class LabelError(JaxrecError):
    """A label in a list file does not fit the model (e.g. outside the classifier's classes)."""


class DatasetError(JaxrecError):
    """A list file, image folder or dataset name is malformed or points at nothing; the message
    names the file and line."""


class GalleryError(JaxrecError):
    """A gallery index, its arguments or the model used with it is wrong (`jaxrec.search`)."""


class ExportError(JaxrecError):
    """A model cannot be exported as asked (`jaxrec.export`): bad source, output or options."""


class DiskFullError(JaxrecError, OSError):
    """A write failed because its filesystem is full (or over quota); the message says what
    could not be written, where, and how much space it needs."""


_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os_error_code='28'")


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` (or an exception it was raised from) is a full filesystem: an OSError with
    ENOSPC/EDQUOT, or a wrapped one (tensorstore/orbax report it as text)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(err) for t in _DISK_FULL_TEXT):
            return True
        # numpy's tofile reports a short write without errno; on a regular file that is a
        # full filesystem (or quota).
        if isinstance(err, OSError) and err.errno is None and " requested and " in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full(what: str, path: str, needed: int | None = None, hint: str = "") -> DiskFullError:
    """The one-line DiskFullError for `what` written under `path` (`needed` bytes, if known)."""
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        free = shutil.disk_usage(probe or ".").free
    except OSError:
        free = None
    size = []
    if needed is not None:
        size.append(f"needs about {_mb(needed)}")
    if free is not None:
        size.append(f"{_mb(free)} free there")
    return DiskFullError(
        f"no space left on device writing {what} to {path}"
        + (f" ({', '.join(size)})" if size else "")
        + "; free space on that filesystem or use another location"
        + (f"; {hint}" if hint else "")
    )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Context manager for command-line entry points: Python warnings inside it print as one
    `warning: ...` line on stderr (no file/line/source echo), every time they are issued."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield
