"""A PostgreSQL server started from an installed `bin` directory (Debian's
`/usr/lib/postgresql/15/bin`, say), so the suite can run against another major version
than the embedded one.

It lives in a temporary directory of its own and listens on a Unix socket there only (no
TCP port, so it never meets another server on the machine), and is stopped and deleted at
the end. PostgreSQL refuses to run as root: as root, the data directory belongs to the
`postgres` system user that the server packages create (or to a system user made here).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from psycopg.conninfo import make_conninfo

PORT = 5432  # names the socket file only: nothing listens on TCP
SERVER_USER = "postgres"


@contextmanager
def installed_server(bin_dir: Path, settings: dict[str, str]) -> Iterator[str]:
    """Start a fresh server from `bin_dir` with `settings`; yield its DSN, stop it after."""
    user = _server_user()
    home = Path(tempfile.mkdtemp(prefix="orch8-pg-"))
    try:
        if user is not None:
            os.chown(home, user.pw_uid, user.pw_gid)
        data = home / "data"
        _run(user, home, bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-sync")
        options = " ".join([f"-p {PORT}", "-h ''", f"-k {home}"]
                           + [f"-c {name}={value}" for name, value in settings.items()])
        _run(user, home, bin_dir / "pg_ctl", "-D", data, "-l", home / "server.log", "-w",
             "-o", options, "start")
        try:
            yield make_conninfo(host=str(home), port=PORT, user="postgres", dbname="postgres")
        finally:
            _run(user, home, bin_dir / "pg_ctl", "-D", data, "-w", "-m", "fast", "stop")
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", SERVER_USER], check=True)
        return pwd.getpwnam(SERVER_USER)


def _run(user: pwd.struct_passwd | None, cwd: Path, *command: object) -> None:
    try:
        subprocess.run([str(part) for part in command], check=True, cwd=cwd,
                       capture_output=True, text=True,
                       user=user.pw_uid if user else None, group=user.pw_gid if user else None)
    except subprocess.CalledProcessError as error:
        log = cwd / "server.log"
        detail = log.read_text() if log.exists() else ""
        raise RuntimeError(f"{error.cmd[0]} failed: {error.stderr}{detail}") from None
