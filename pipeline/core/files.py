"""Files written whole or not at all: a temporary name beside the final one, then a rename.

A temporary file is named ``.<final name>.<host>-<pid>.tmp``. A process killed mid-write
leaves it behind; the next writer in the folder removes those of this host whose process
is gone (a shared folder's other hosts clean up their own).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
from pathlib import Path

log = logging.getLogger(__name__)

_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"
_TEMP = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.tmp$")


def sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def temporary(final: Path) -> Path:
    """Where to write ``final`` before renaming it into place (same folder, same disk)."""
    return final.with_name(f".{final.name}.{_HOST}-{os.getpid()}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(folder: Path, *, recursive: bool = False) -> list[Path]:
    """Remove the temporary files that dead processes of this host left in ``folder`` (and
    its subfolders when ``recursive``)."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.rglob(".*.tmp") if recursive else folder.iterdir():
        m = _TEMP.match(path.name)
        if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d files left by killed processes in %s", len(removed), folder)
    return removed
