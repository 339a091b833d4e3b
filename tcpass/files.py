"""Files users load: atomic writes and checksums (torch-free, like `tcpass.plan`)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def plain_file_mode() -> int:
    """The permissions ``open(path, "w")`` would give a new file: 0o666 less the process umask (the
    temporary files atomic writes go through are created 0o600, readable by their owner only)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename.

    A reader sees the old file or the new one, never a partial write: an interrupted write leaves
    at most a ``.tmp`` file that nothing loads. The file gets the permissions of a plain write
    (`plain_file_mode`), so a plan shared in a team directory stays readable. Missing parent
    directories are created (a calibration does not fail at its last step over ``-o new_dir/plan.json``).
    """
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), plain_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_sha256(path: str | Path, expected: str, what: str = "the plan's selector.sha256") -> None:
    """Raise ``ValueError`` unless the file at ``path`` has sha256 ``expected`` (``what`` names where
    the expected value comes from, for the message)."""
    digest = sha256_of(path)
    if digest != expected:
        raise ValueError(
            f"{path}: sha256 {digest} does not match {what} {expected}: the file was changed or belongs "
            "to another plan."
        )


def resolve_path(path: str | Path, directory: str | Path | None) -> Path:
    """``path`` if absolute or without ``directory``, else ``directory / path`` (plan files are
    relative to the plan's directory)."""
    path = Path(path)
    return path if path.is_absolute() or directory is None else Path(directory) / path
