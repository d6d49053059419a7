"""The one atomic writer: every file or folder lmforge writes is built under a temporary name beside
its target and renamed into place, so a crash at any moment leaves the old one whole or the new one
whole, never half of either.

Files get the mode any new file gets under the umask (0644 under umask 022), whatever the library
that wrote them chose: safetensors writes through a temporary file of its own, created 0600.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """This process's umask, read without changing it where Linux reports it (os.umask can only
    read it by setting it, which would race with files other threads create meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give a written file (or each file in a written folder) the read/write bits the umask allows any
    new file; execute bits, a compiled library's, are kept. mkdir already honours the umask."""
    mask = current_umask()
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(file, (stat.S_IMODE(file.stat().st_mode) | 0o666) & ~mask)


def remove(path: Path) -> None:
    """Delete a file or folder tree if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temporary_path_beside(path: Path, concurrent_writers: bool = False) -> Path:
    """Where `path` is built before its rename: `.NAME.tmp`, or `.NAME.PID.tmp` per process. Processes that
    write one folder together (a sharded checkpoint) find the main process's temporary folder by it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp" if concurrent_writers else f".{path.name}.tmp")


@contextmanager
def temporary_beside(path: Path, concurrent_writers: bool = False) -> Iterator[Path]:
    """A free temporary path beside `path`, removed (with whatever was written there) on the way out.

    It is `.NAME.tmp`, so the leftover of a killed write is cleared by the next one; with
    `concurrent_writers` (several processes may build the same path at once) each process gets its own.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path_beside(path, concurrent_writers)
    remove(temporary)
    try:
        yield temporary
    finally:
        remove(temporary)


def write_atomically(path: str | Path, write: Callable[[Path], object], concurrent_writers: bool = False) -> Path:
    """Call `write(temporary)` to create a file (or a folder) at a temporary path beside `path`, then
    rename it over `path`. If `write` raises, `path` is untouched and the temporary is removed."""
    path = Path(path)
    with temporary_beside(path, concurrent_writers) as temporary:
        write(temporary)
        honour_umask(temporary)
        if temporary.is_dir() and path.is_dir():
            # rename cannot replace a non-empty folder: move the old one aside first. A crash between
            # the two renames leaves it whole under `.NAME.old`.
            old = path.with_name(f".{path.name}.old")
            remove(old)
            os.rename(path, old)
            try:
                os.rename(temporary, path)
            except OSError:
                os.rename(old, path)
                raise
            remove(old)
        else:
            os.replace(temporary, path)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """`path.write_text(text)` through `write_atomically`."""
    return write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_files_atomically(folder: str | Path, writers: dict[str, Callable[[Path], object]]) -> Path:
    """Write each `name: write(path)` into a temporary folder, then move them into `folder` in order;
    other files in `folder` stay. If a writer raises, every old file is untouched.

    Once writing has finished, a crash leaves the old file or the new one under each name, never half
    a file; put the file that marks a complete folder (its config) last.
    """
    folder = Path(folder)
    with temporary_beside(folder / "writing") as staging:
        staging.mkdir()
        for name, write in writers.items():
            write(staging / name)
        honour_umask(staging)
        for name in writers:
            os.replace(staging / name, folder / name)
    return folder


def write_folder_atomically(folder: str | Path, writers: dict[str, Callable[[Path], object]]) -> Path:
    """Build a whole folder from `name: write(path)` writers and rename it over `folder`: files an
    older `folder` held that `writers` do not name are gone with it."""

    def write_all(staging: Path) -> None:
        staging.mkdir()
        for name, write in writers.items():
            write(staging / name)

    return write_atomically(folder, write_all)
