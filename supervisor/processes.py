"""Whether a process id names a live process (on this host)."""

from __future__ import annotations

import os


def exists(pid: int) -> bool:
    """True if `pid` is a live process; one we may not signal counts as live."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
