"""The one atomic writer: a failed write leaves the old file or folder whole and no temporary behind;
written files get the mode the umask gives new files."""

import os

import pytest

from lmforge.atomic import write_atomically, write_files_atomically, write_folder_atomically, write_text_atomically


class Crash(Exception):
    pass


def half_then_crash(path):
    path.write_text("half of the new")
    raise Crash


def test_a_crash_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = write_text_atomically(tmp_path / "notes.txt", "old")
    with pytest.raises(Crash):
        write_atomically(target, half_then_crash)
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    write_text_atomically(target, "new")
    assert target.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_a_crash_mid_folder_leaves_the_old_folder_and_no_temporary(tmp_path):
    folder = write_folder_atomically(
        tmp_path / "model", {"a": lambda p: p.write_text("old a"), "b": lambda p: p.write_text("old b")}
    )
    with pytest.raises(Crash):
        write_folder_atomically(folder, {"a": lambda p: p.write_text("new a"), "b": half_then_crash})
    assert {p.name: p.read_text() for p in folder.iterdir()} == {"a": "old a", "b": "old b"}
    assert os.listdir(tmp_path) == ["model"]
    write_folder_atomically(folder, {"a": lambda p: p.write_text("new a")})
    assert {p.name: p.read_text() for p in folder.iterdir()} == {"a": "new a"}  # the whole folder is replaced
    assert os.listdir(tmp_path) == ["model"]


def test_a_crash_mid_files_leaves_every_old_file_and_no_temporary(tmp_path):
    (tmp_path / "other").write_text("not ours")
    write_files_atomically(
        tmp_path, {"weights": lambda p: p.write_text("old w"), "config": lambda p: p.write_text("old c")}
    )
    with pytest.raises(Crash):
        write_files_atomically(tmp_path, {"weights": lambda p: p.write_text("new w"), "config": half_then_crash})
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "other": "not ours",
        "weights": "old w",
        "config": "old c",
    }
    write_files_atomically(tmp_path, {"config": lambda p: p.write_text("new c")})
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "other": "not ours",
        "weights": "old w",
        "config": "new c",
    }


def test_the_leftover_of_a_killed_write_is_cleared_by_the_next(tmp_path):
    (tmp_path / ".model.tmp").mkdir()
    (tmp_path / ".model.tmp" / "half").write_text("")
    write_folder_atomically(tmp_path / "model", {"a": lambda p: p.write_text("a")})
    assert os.listdir(tmp_path) == ["model"]


def write_private(path):
    # As safetensors does: its own temporary file, created 0600 whatever the umask.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(descriptor)


def write_executable(path):
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o777)
    os.close(descriptor)


@pytest.mark.parametrize(("umask", "private", "executable"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_follow_the_umask(tmp_path, umask, private, executable):
    previous = os.umask(umask)
    try:
        written = [
            write_atomically(tmp_path / "file", write_private),
            write_atomically(tmp_path / "library.so", write_executable),
            write_folder_atomically(tmp_path / "folder", {"inner": write_private}) / "inner",
            write_files_atomically(tmp_path / "files", {"inner": write_private}) / "inner",
        ]
    finally:
        os.umask(previous)
    modes = [os.stat(path).st_mode & 0o777 for path in written]
    assert modes == [private, executable, private, private]
    assert os.stat(tmp_path / "folder").st_mode & 0o777 == 0o777 & ~umask
