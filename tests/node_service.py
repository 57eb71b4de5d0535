"""What `systemctl start|restart` does for one node, for tests of `orch8 rollout`.

    python node_service.py start|restart STATE_DIR NODE

STATE_DIR/NODE.json holds the node's environment; the running supervisor's pid is kept in
STATE_DIR/NODE.pid and its output appended to STATE_DIR/NODE.log. `restart` sends SIGTERM
to the running supervisor (if any), waits for it to exit (SIGKILL to its process group
after STOP_TIMEOUT_S, like TimeoutStopSec), then starts a new one, as systemd would. The
new supervisor runs in a session of its own (its pgid is its pid) and outlives this
command, like a service outlives `systemctl`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STOP_TIMEOUT_S = 60.0


def pid_file(state_dir: Path, node: str) -> Path:
    return state_dir / f"{node}.pid"


def running_pid(state_dir: Path, node: str) -> int | None:
    """The supervisor's pid while it runs (a zombie counts as exited)."""
    try:
        pid = int(pid_file(state_dir, node).read_text())
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return None if stat.rsplit(")", 1)[1].split()[0] == "Z" else pid


def start(state_dir: Path, node: str) -> int:
    environ = json.loads((state_dir / f"{node}.json").read_text())
    with (state_dir / f"{node}.log").open("ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "supervisor.main"], env=environ,
                                   stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    pid_file(state_dir, node).write_text(str(process.pid))
    return process.pid


def stop(state_dir: Path, node: str) -> None:
    pid = running_pid(state_dir, node)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while running_pid(state_dir, node) is not None:
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    action, state_dir, node = argv[0], Path(argv[1]), argv[2]
    if action == "restart":
        stop(state_dir, node)
    print(f"{node}: started pid {start(state_dir, node)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
