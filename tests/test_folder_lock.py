"""The one-writer folder lock that a training run (its marker) and a folder job (ddpm-sample, ddpm-nll, ddpm-edit) take.

flock locks belong to an open file, so two FolderLocks of one process contend as two processes do."""

import json
import os

import pytest

pytest.importorskip("fcntl", reason="the folder lock is an OS file lock (fcntl), which this platform lacks")

from ddpm_hf.outputs.folder_lock import FolderLock, holder_record  # noqa: E402


def test_a_held_folder_is_refused_with_its_holder_and_nothing_is_made(tmp_path):
    first = FolderLock(tmp_path / "out", ".lock")
    assert first.acquire() is None
    first.write(holder_record(state="running"))
    second = FolderLock(tmp_path / "out", ".lock")
    holder = second.acquire()
    assert holder["pid"] == os.getpid() and holder["state"] == "running" and second.fd is None
    first.release()
    assert second.acquire() is None  # released: the next writer takes it
    second.release()


def test_an_abandoned_lock_leaves_no_folder_or_file_of_its_making(tmp_path):
    lock = FolderLock(tmp_path / "a" / "b", ".lock")
    assert lock.acquire() is None and (tmp_path / "a" / "b" / ".lock").is_file()
    lock.write(holder_record())
    lock.release(abandon=True)
    assert not (tmp_path / "a").exists() and tmp_path.is_dir()  # each folder it made, and only those


def test_an_abandoned_lock_puts_back_the_file_it_found_byte_for_byte(tmp_path):
    (tmp_path / ".lock").write_bytes(b'{"pid": 1, "state": "ended"}\n  ')
    lock = FolderLock(tmp_path, ".lock")
    assert lock.acquire() is None
    lock.write(holder_record(state="running"))
    lock.release(abandon=True)
    assert (tmp_path / ".lock").read_bytes() == b'{"pid": 1, "state": "ended"}\n  '
    kept = FolderLock(tmp_path, ".lock")
    kept.acquire()
    kept.write(holder_record(state="ended"))
    kept.release()  # a writer that started leaves its record
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_a_folder_that_cannot_be_made_is_one_line_naming_it(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError, match=r"^Cannot write to --out .*/file/x \(.*\); choose a folder you can write to\.$"):
        FolderLock(tmp_path / "file" / "x", ".lock", named=f"--out {tmp_path / 'file' / 'x'}").acquire()
