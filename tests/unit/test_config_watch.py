"""What counts as a change of CHATGATE_CONFIG: new content, however it arrives."""

from __future__ import annotations

import os
from pathlib import Path

from chatgate_server.config_watch import ConfigWatch


async def _never() -> bool:  # pragma: no cover - the watch's loop is not run here
    return False


def test_new_content_is_a_change_once(tmp_path: Path) -> None:
    path = tmp_path / "chatgate.toml"
    path.write_text("a = 1\n")
    watch = ConfigWatch(path, _never)
    assert not watch.changed()
    path.write_text("a = 2\n")
    os.utime(path, ns=(1, 1))  # whatever the clock's resolution, the stat differs
    assert watch.changed()
    assert not watch.changed()  # seen: not reloaded again (a refused file is not retried)


def test_a_touch_or_the_same_content_rewritten_is_no_change(tmp_path: Path) -> None:
    path = tmp_path / "chatgate.toml"
    path.write_text("a = 1\n")
    watch = ConfigWatch(path, _never)
    os.utime(path, ns=(5, 5))
    assert not watch.changed()
    path.unlink()
    path.write_text("a = 1\n")  # a new inode, the same bytes
    assert not watch.changed()


def test_a_configmap_symlink_swap_is_a_change(tmp_path: Path) -> None:
    """Kubernetes mounts chatgate.toml -> ..data/chatgate.toml, ..data -> ..<timestamp>/;
    an update writes a new directory and swaps ..data to it in one rename."""
    first, second = tmp_path / "..2026_12_05_00_00_01", tmp_path / "..2026_12_05_00_01_02"
    first.mkdir()
    (first / "chatgate.toml").write_text("a = 1\n")
    (tmp_path / "..data").symlink_to(first.name)
    path = tmp_path / "chatgate.toml"
    path.symlink_to("..data/chatgate.toml")
    watch = ConfigWatch(path, _never)
    second.mkdir()
    (second / "chatgate.toml").write_text("a = 2\n")
    (tmp_path / "..data_tmp").symlink_to(second.name)
    (tmp_path / "..data_tmp").replace(tmp_path / "..data")
    assert watch.changed()
    assert not watch.changed()


def test_a_file_missing_for_a_moment_is_no_change(tmp_path: Path) -> None:
    path = tmp_path / "chatgate.toml"
    path.write_text("a = 1\n")
    watch = ConfigWatch(path, _never)
    path.unlink()
    assert not watch.changed()  # mid-swap: keep what runs
    path.write_text("a = 1\n")
    assert not watch.changed()  # back as it was
    path.write_text("a = 22\n")
    assert watch.changed()


def test_rebase_takes_the_file_as_seen(tmp_path: Path) -> None:
    path = tmp_path / "chatgate.toml"
    path.write_text("a = 1\n")
    watch = ConfigWatch(path, _never)
    path.write_text("a = 2\n")
    watch.rebase()  # a SIGHUP reload read it
    assert not watch.changed()
