"""README.md, followed from top to bottom as a newcomer would, against a real node.

The convention every block follows is in tests/markdown_blocks.py. The blocks run with the
reader's commands verbatim; only the environment differs from a fresh clone's: the
database is the test's own (`DATABASE_URL`), and the node listens on a free port
(`ORCH8_BIND`, with `ORCH8_URL` for the command line) so tests never meet a real 8080.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.markdown_blocks import Session, parse
from tests.supervisor_process import REPO_DIR, free_port, wait_until

README = REPO_DIR / "README.md"
EXAMPLES = REPO_DIR / "examples"


def test_every_shell_and_python_block_says_whether_it_runs():
    problems = parse(README.read_text()).problems
    assert not problems, ("README.md: blocks must say whether the README test runs them "
                          "(tests/markdown_blocks.py):\n" + "\n".join(problems))


def test_the_files_the_readme_saves_are_the_examples():
    saved = [block for block in parse(README.read_text()).blocks if block.action == "file"]
    assert saved, "the tour saves its files"
    for block in saved:
        assert (EXAMPLES / block.argument).read_text() == block.source, block.where


def reader_environment(**settings: str) -> dict[str, str]:
    """This process's environment as a reader's shell would have it, plus `settings`."""
    port = free_port()
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("ORCH8_")
                   and key not in ("DATABASE_URL", "PYTHONPATH", "VIRTUAL_ENV")}
    return environment | {"ORCH8_BIND": f"127.0.0.1:{port}",
                          "ORCH8_URL": f"http://127.0.0.1:{port}",
                          "PYTHONUNBUFFERED": "1"} | settings


def follow(session: Session) -> list[str]:
    """Run every block in order; return the actions of the nodes it started."""
    document = parse(README.read_text())
    try:
        for block in document.blocks:
            session.run(block)
        session.stop_node()
    finally:
        session.kill()
    return [block.action for block in document.blocks
            if block.action == "node" or (block.action == "install" and session.fresh_clone)]


def test_the_readme_runs_top_to_bottom(dsn: str, tmp_path: Path):
    session = Session(README, tmp_path, reader_environment(DATABASE_URL=dsn), EXAMPLES)
    started = follow(session)
    # Every node the README starts stops cleanly on the reader's Ctrl-C.
    assert started and session.node_exit_codes == [0] * len(started)


@pytest.mark.slow
def test_a_fresh_clone_follows_the_readme(tmp_path: Path):
    """The set-up command too: a new `.venv`, installed from the index, and the embedded
    PostgreSQL a node starts when `DATABASE_URL` is unset (in a data directory of the
    test's own, so the machine's default one is never touched)."""
    clone = tmp_path / "orch8"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_DIR, check=True,
                             capture_output=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_DIR / name, clone / name)
    data_dir = tmp_path / "postgres"
    session = Session(README, clone, reader_environment(ORCH8_DATA_DIR=str(data_dir)),
                      fresh_clone=True)
    started = follow(session)
    assert started[0] == "install" and session.node_exit_codes == [0] * len(started)
    # The embedded server stops once the last process using it has gone.
    wait_until(lambda: not embedded_servers(data_dir), 60, "the embedded server to stop")


def embedded_servers(data_dir: Path) -> list[int]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if str(data_dir) in " ".join(process.info["cmdline"] or []):
            found.append(process.info["pid"])
    return found
