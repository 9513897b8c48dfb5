"""``.upcycle-manifest.json``: the files upcycle wrote in a folder, the only ones it ever deletes.

Every verb that writes a folder (``expand``, ``merge``, ``export``, the ``continue-train`` run folder,
``quickstart``) lists what it wrote in ``ROOT/.upcycle-manifest.json`` (``{"files": [...]}``, paths
relative to ROOT with ``/``). ``--force`` deletes listed files only, after checking every entry:

- an entry must name a path inside ROOT: relative, without ``..`` or ``.``, not absolute;
- no folder on the way from ROOT to it may be a symlink (deletion never follows a link out of ROOT);
- what it names must be a regular file or a symlink (a symlink is removed as a link, its target stays).

Any other entry refuses the whole operation before anything is deleted. A manifest that cannot be read
(torn, not JSON, wrong shape) proves nothing: it is treated as listing no files, and ``damaged`` says why.
The manifest is written atomically (temporary file in ROOT, fsync, ``os.replace``).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from upcycle.errors import UpcycleError

NAME = ".upcycle-manifest.json"


def current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Manifest:
    """The manifest of ``root``: read, record, forget, remove the listed files."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.path = self.root / NAME
        self.damaged: str | None = None  # why the manifest could not be read, after ``entries()``

    # ------------------------------------------------------------------ reading

    def entries(self) -> list[str]:
        """The listed names as stored (unchecked); ``[]`` when there is no readable manifest."""
        self.damaged = None
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as error:
            self.damaged = error.strerror or type(error).__name__
            return []
        try:
            files = json.loads(raw.decode("utf-8"))["files"]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as error:
            self.damaged = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}"
            return []
        if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
            self.damaged = "its 'files' is not a list of paths"
            return []
        return files

    def read(self) -> set[str]:
        """The listed names, every one checked (an unsafe entry raises ``UpcycleError``)."""
        names = self.entries()
        for name in names:
            self.check(name)
        return set(names)

    def check(self, name: str) -> Path:
        """``root / name`` if ``name`` may be deleted by upcycle; ``UpcycleError`` otherwise."""
        parts = PurePosixPath(name).parts
        if (not name or "\\" in name or "\0" in name or PurePosixPath(name).is_absolute()
                or any(part in ("", ".", "..") for part in parts) or name.split("/") != list(parts)):
            self.refuse(name, "which is not a plain path inside the folder")
        path = self.root
        for i, part in enumerate(parts):
            path = path / part
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                return self.root.joinpath(*parts)  # nothing there to delete
            except NotADirectoryError:
                return self.root.joinpath(*parts)
            if stat.S_ISLNK(mode) and i < len(parts) - 1:
                self.refuse(name, f"which lies behind the symlink {path}")
            if i == len(parts) - 1 and not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                self.refuse(name, "which is not a regular file")
        return path

    def owned(self, ignore: Iterable[str] = ()) -> set[str]:
        """``read()``, refusing an unreadable manifest when root holds anything else (nothing there is provably
        ours); names in ``ignore`` (a run folder's lock) do not count."""
        names = self.read()
        if self.damaged and self.root.is_dir():
            others = sorted(p.name for p in self.root.iterdir() if not p.name.startswith(NAME) and p.name not in ignore)
            if others:
                self.refuse_damaged(self.root / others[0])
        return names

    def refuse(self, name: str, why: str) -> None:
        raise UpcycleError(f"{self.path} lists {name!r}, {why}: upcycle only deletes files it wrote inside "
                           f"{self.root}; remove {self.root} yourself or choose another output folder")

    def refuse_damaged(self, example: str | os.PathLike) -> None:
        """Refuse to replace ``example`` because the manifest is unreadable (call after ``entries()``)."""
        raise UpcycleError(f"{self.path} is unreadable ({self.damaged}), so upcycle cannot prove it wrote {example}: "
                           f"remove {self.root} yourself or choose another output folder")

    # ------------------------------------------------------------------ writing

    def write(self, names: Iterable[str]) -> None:
        """Replace the manifest with ``names``, atomically."""
        text = json.dumps({"files": sorted(set(names) - {NAME})}, indent=1) + "\n"
        self.root.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f"{NAME}.", suffix=".tmp", dir=self.root)
        try:
            os.fchmod(handle, 0o666 & ~current_umask())  # mkstemp makes it private; follow the umask like every file
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(text)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows it
            folder = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def files_under(self, *paths: str | os.PathLike) -> list[str]:
        """Names (relative to root) of the regular files at or under ``paths``; symlinks are not followed."""
        found: list[str] = []
        for given in paths:
            path = Path(given)
            name = self.relative(path)
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISREG(mode):
                found.append(name)
            elif stat.S_ISDIR(mode):
                for folder, dirs, files in os.walk(path):  # os.walk does not descend into symlinked folders
                    dirs.sort()
                    for file in sorted(files):
                        full = Path(folder) / file
                        with contextlib.suppress(FileNotFoundError):
                            if stat.S_ISREG(os.lstat(full).st_mode):
                                found.append(self.relative(full))
        return found

    def relative(self, path: Path) -> str:
        try:
            return Path(os.path.abspath(path)).relative_to(os.path.abspath(self.root)).as_posix()
        except ValueError:
            raise ValueError(f"{path} is not inside {self.root}") from None

    def record(self, *paths: str | os.PathLike) -> None:
        """Add files this run wrote (a folder: every regular file under it) to the manifest."""
        names = set(self.entries()) | set(self.files_under(*paths))
        names.discard(NAME)
        self.write(names)

    def include(self, folder: str | os.PathLike) -> None:
        """Record what another manifest in ``folder`` (below root) lists, and that manifest itself."""
        inner = Manifest(folder)
        listed = [inner.root / name for name in sorted(inner.read())]
        self.record(*listed, inner.path)

    def forget(self, under: str | os.PathLike | None = None) -> None:
        """Drop the entries at or under ``under`` (everything when ``None``) from the manifest; delete nothing."""
        prefix = None if under is None else self.relative(Path(under))
        kept = [n for n in self.entries() if prefix is not None and n != prefix and not n.startswith(prefix + "/")]
        if self.path.exists() or kept:
            self.write(kept)

    # ------------------------------------------------------------------ deleting

    def remove_listed(self, under: str | os.PathLike | None = None, keep: Iterable[str] = ()) -> list[str]:
        """Delete the listed files at or under ``under`` (all when ``None``), except ``keep``.

        Every entry is checked first (``UpcycleError`` before anything is deleted); then the files go
        (symlinks as links), then the folders they leave empty, innermost first, never ``root`` itself.
        The manifest is updated to list what remains. Returns the names deleted.
        """
        names = self.read()
        prefix = None if under is None else self.relative(Path(under))
        keep = set(keep)
        chosen = sorted(n for n in names if n not in keep and n != NAME
                        and (prefix is None or n == prefix or n.startswith(prefix + "/")))
        for name in chosen:  # every entry was checked by read(); again right before each deletion
            path = self.check(name)
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.unlink(path)
        folders = {PurePosixPath(n).parents[i] for n in chosen for i in range(len(PurePosixPath(n).parts) - 1)}
        for folder in sorted(folders, key=lambda p: -len(p.parts)):
            path = self.root.joinpath(*folder.parts)
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    os.rmdir(path)  # only succeeds when empty
        if chosen and self.path.exists():
            self.write(names - set(chosen))
        return chosen
