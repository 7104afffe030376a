"""Atomic outputs get the mode a plain open()/mkdir() would give under the umask, not mkstemp's private 0600."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from jurassiglip.runtime import atomic


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)

    def set_to(mask: int) -> None:
        os.umask(mask)

    yield set_to
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                        (0o002, 0o664, 0o775)])
def test_files_and_folders_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    atomic.write_text(tmp_path / "metrics.json", "{}\n")
    atomic.write_with(tmp_path / "array.npy", lambda tmp: np.save(open(tmp, "wb"), np.zeros(3)))
    with atomic.atomic_dir(tmp_path / "gallery") as folder:
        (folder / "index.html").write_text("<html></html>")
    assert mode(tmp_path / "metrics.json") == file_mode
    assert mode(tmp_path / "array.npy") == file_mode
    assert mode(tmp_path / "gallery") == dir_mode
    assert mode(tmp_path / "gallery" / "index.html") == file_mode  # created inside: plain open()
    # what the process would get without the atomic writer, for comparison
    (tmp_path / "plain.txt").write_text("x")
    assert mode(tmp_path / "plain.txt") == file_mode


def test_reading_the_umask_leaves_it_as_it_was(umask):
    umask(0o027)
    assert atomic.current_umask() == 0o027
    assert atomic.current_umask() == 0o027
