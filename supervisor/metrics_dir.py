"""The node's metrics directory: one file of counts per process, summed at each scrape.

Every process of the node (the supervisor and each worker) writes its counts through to a
file of its own here as it counts (`orch8.engine.stats`), so a process killed with SIGKILL
loses nothing it counted, and `/metrics` sums the files of live and dead processes alike.

The directory is new at every start: a restarted node counts from zero, as Prometheus
expects of a restarted process. It lives in the temporary directory, readable by its user
only, and is removed when the node exits. A supervisor killed with SIGKILL cannot remove
its own, so each start also removes the directories of supervisors that are gone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from orch8.engine.stats import METRICS_DIR_VARIABLE
from supervisor import processes

PREFIX = "orch8-metrics-"
_LEFT_BEHIND = re.compile(rf"^{PREFIX}(\d+)-")


def create() -> str:
    """A fresh directory for this process's node; exported for the workers to inherit."""
    remove_left_behind()
    path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")
    os.environ[METRICS_DIR_VARIABLE] = path
    return path


def remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_left_behind() -> None:
    """Remove the directories of this user's supervisors that no longer run."""
    for entry in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        match = _LEFT_BEHIND.match(entry.name)
        try:
            mine = entry.is_dir() and entry.stat().st_uid == os.getuid()
        except OSError:
            continue
        if match and mine and not processes.exists(int(match.group(1))):
            remove(str(entry))
