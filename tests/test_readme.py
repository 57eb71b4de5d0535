"""README.md, followed from top to bottom as a newcomer would, against a real node.

The convention every block follows is in tests/markdown_blocks.py. The blocks run with the
reader's commands verbatim; only the environment differs from a fresh clone's: the
database is the test's own (`DATABASE_URL`), and the node listens on a free port
(`ORCH8_BIND`, with `ORCH8_URL` for the command line) so tests never meet a real 8080.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.markdown_blocks import Session, parse
from tests.supervisor_process import REPO_DIR, free_port

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


def test_the_readme_runs_top_to_bottom(dsn: str, tmp_path: Path):
    port = free_port()
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("ORCH8_") and key not in ("DATABASE_URL", "PYTHONPATH")}
    environment |= {"DATABASE_URL": dsn, "ORCH8_BIND": f"127.0.0.1:{port}",
                    "ORCH8_URL": f"http://127.0.0.1:{port}", "PYTHONUNBUFFERED": "1"}
    document = parse(README.read_text())
    session = Session(README, tmp_path, environment, EXAMPLES)
    try:
        for block in document.blocks:
            session.run(block)
        session.stop_node()
    finally:
        session.kill()
    started = [block for block in document.blocks if block.action == "node"]
    # Every node the README starts stops cleanly on the reader's Ctrl-C.
    assert session.node_exit_codes == [0] * len(started) and started
