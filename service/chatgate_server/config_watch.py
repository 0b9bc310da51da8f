"""Reload CHATGATE_CONFIG when the file changes, not only on SIGHUP.

A poll (every ``CHATGATE_CONFIG_POLL_SECONDS``, 2 s by default), not inotify: a
Kubernetes ConfigMap mount changes by swapping a symlink (``..data``) to a new
directory, which a watch on the file itself never sees, and some filesystems (network
mounts, overlay layers) send no events at all. A stat of one small file every two
seconds costs nothing measurable.

Each poll stats the path, following symlinks; only when what it reaches has changed
(device, inode, size, modification time) is the file read and hashed, and only a new
content hash reloads. So a ``touch``, or a swap to identical content, reloads nothing;
a file absent for a moment (mid-swap, or an editor's rename) is skipped until it is
back; a bad file is refused once (``App.reload`` logs the one line) and not tried again
until its content changes. Reload rules are the SIGHUP ones: the watch only decides when.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from chatgate_server.background import stop_tasks

log = logging.getLogger(__name__)

_Stat = tuple[int, int, int, int]


def _stat(path: Path) -> _Stat | None:
    try:
        st = path.stat()  # follows symlinks: a swapped ..data link reaches a new inode
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _digest(path: Path) -> bytes | None:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None


class ConfigWatch:
    """Calls ``reload`` when the content of ``path`` changes (checked every ``interval_s``)."""

    def __init__(self, path: Path, reload: Callable[[], Awaitable[bool]], interval_s: float = 2.0) -> None:
        self.path = path
        self._reload = reload
        self.interval_s = interval_s
        self._stat: _Stat | None = None
        self._digest: bytes | None = None
        self._task: asyncio.Task[None] | None = None
        self.rebase()

    def rebase(self) -> None:
        """Take the file as it is now as seen (done before each reload, whatever asked
        for it, so a SIGHUP reload is not repeated by the next poll)."""
        self._stat = _stat(self.path)
        self._digest = _digest(self.path)

    def changed(self) -> bool:
        """Whether the content differs from what was last seen (and now counts as seen).
        A missing or unreadable file is no change: the running configuration stays."""
        stat = _stat(self.path)
        if stat is None or stat == self._stat:
            return False
        digest = _digest(self.path)
        if digest is None:
            return False
        self._stat = stat
        if digest == self._digest:
            return False
        self._digest = digest
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="config-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_tasks(task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                if await asyncio.to_thread(self.changed):
                    log.info("%s changed: reloading", self.path)
                    await self._reload()
            except asyncio.CancelledError:
                raise
            except Exception:  # a reload bug must not end the watch: the next change tries again
                log.exception("reloading %s after a change failed", self.path)
