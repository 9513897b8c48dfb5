"""The one exception type the CLI turns into a one-line message, and the one-line form of system errors."""

from __future__ import annotations

import errno


class UpcycleError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""


class DamagedCheckpoint(UpcycleError):
    """A checkpoint file that cannot be read (the trainer names an older checkpoint to resume instead)."""

    def __init__(self, message: str, path: object = None):
        super().__init__(message)
        self.path = path


DISK_FULL = "free some disk space or choose an output folder on another disk; nothing half-written was kept"


def describe(error: BaseException) -> str | None:
    """The one-line message for a known system error (disk full, permissions, safetensors I/O), else None."""
    if isinstance(error, OSError):
        where = f" ({error.filename})" if error.filename else ""
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"no space left on the disk{where}: {DISK_FULL}"
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"{error.strerror}{where}: choose an output folder you can write to"
        return f"{error.strerror or error}{where}"
    if type(error).__name__ == "SafetensorError":  # safetensors' Rust I/O errors (no errno)
        text = str(error)
        if "StorageFull" in text or "No space left" in text or "os error 28" in text:
            return f"no space left on the disk while writing safetensors: {DISK_FULL}"
        if "PermissionDenied" in text:
            return "permission denied while writing safetensors: choose an output folder you can write to"
        first = text.strip().splitlines()[0] if text.strip() else "unreadable"
        return f"cannot read or write a safetensors file ({first[:200]}): the file is damaged or the disk failed"
    return None
