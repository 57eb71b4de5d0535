"""Run a Markdown document's code blocks the way a reader would: copy, paste, run.

Every fenced block in a shell or Python language must be preceded by one marker comment
(a blank line between them is allowed), saying what a reader does with it:

    <!-- test: run -->          run it: shell blocks with `bash -e -o pipefail`, Python
                                blocks in one namespace shared by the whole document
    <!-- test: node -->         a shell command that starts a node and keeps running: it runs
                                in the background until the document ends, and the next
                                block waits for its /health/ready; a later `node` block
                                stops it first with SIGINT (the reader's Ctrl-C)
    <!-- test: file NAME -->    the reader saves this block as NAME
    <!-- test: output -->       (any language) what the `run` block before it printed,
                                compared line by line
    <!-- test: skip REASON -->  not run; the reason is required
    <!-- test: install -->      the set-up command (makes `.venv`, installs, starts a node):
                                a `node` block in the slow fresh-clone test, which has no
                                `.venv` yet; skipped by the others, which bring their own

A shell or Python block without a marker is a problem the README test reports, so a block
added without thought fails the suite instead of silently going untested. Blocks in other
languages (`text`, `json`, ...) need no marker. Everything runs in a scratch directory that
holds a link to the test run's virtual environment as `.venv` and a copy of `examples/`
(or, for the fresh-clone test, in a copy of the repository with no `.venv`), with the
environment the caller gives (the database and the node's address).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

SHELL_LANGUAGES = frozenset({"sh", "bash", "shell", "console", "zsh"})
PYTHON_LANGUAGES = frozenset({"python", "py", "python3", "pycon"})
CHECKED_LANGUAGES = SHELL_LANGUAGES | PYTHON_LANGUAGES
ACTIONS = frozenset({"run", "node", "file", "output", "skip", "install"})

BLOCK_TIMEOUT_S = 180
NODE_READY_TIMEOUT_S = 60
# The set-up command installs the project from the package index before the node starts.
INSTALL_READY_TIMEOUT_S = 900
NODE_STOP_TIMEOUT_S = 60

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*test:\s*(?P<action>\S+)\s*(?P<argument>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, counting from 1
    language: str
    source: str
    action: str | None = None
    argument: str = ""

    @property
    def where(self) -> str:
        return f"line {self.line} ({self.language or 'no language'} block)"


@dataclass
class Document:
    blocks: list[Block] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def parse(text: str) -> Document:
    """The fenced blocks of `text` with their markers, and what breaks the convention."""
    document = Document()
    lines = text.splitlines()
    marker: tuple[int, str, str] | None = None
    index = 0
    while index < len(lines):
        found = _MARKER.match(lines[index])
        fence = _FENCE.match(lines[index])
        if found:
            _dangling(document, marker)
            marker = (index + 1, found["action"], found["argument"])
        elif fence:
            index = _read_block(document, lines, index, fence, marker)
            marker = None
        elif lines[index].strip():
            _dangling(document, marker)
            marker = None
        index += 1
    _dangling(document, marker)
    for block in document.blocks:
        document.problems.extend(_check(block))
    return document


def _read_block(document: Document, lines: list[str], start: int, fence: re.Match[str],
                marker: tuple[int, str, str] | None) -> int:
    """Add the block opened at `start`; return the index of its closing fence."""
    opening = fence["fence"]
    indent = len(fence["indent"])
    body: list[str] = []
    index = start + 1
    while index < len(lines):
        stripped = lines[index].strip()
        if stripped.startswith(opening) and set(stripped) == {opening[0]}:
            break
        body.append(lines[index][indent:] if lines[index][:indent].isspace() else lines[index])
        index += 1
    info = fence["info"].split()
    action, argument = (marker[1], marker[2]) if marker else (None, "")
    document.blocks.append(Block(start + 1, info[0].lower() if info else "",
                                 "\n".join(body) + "\n", action, argument))
    return index


def _dangling(document: Document, marker: tuple[int, str, str] | None) -> None:
    if marker is not None:
        document.problems.append(f"line {marker[0]}: a test marker with no block after it")


def _check(block: Block) -> list[str]:
    if block.action is None:
        if block.language in CHECKED_LANGUAGES:
            return [f"{block.where}: no test marker; put `<!-- test: run -->` (or node, file "
                    "NAME, skip REASON) on the line before it"]
        return []
    if block.action not in ACTIONS:
        return [f"{block.where}: unknown test marker {block.action!r}"]
    if block.action == "skip" and not block.argument:
        return [f"{block.where}: `skip` needs a reason"]
    if block.action == "file" and not re.fullmatch(r"[\w./-]+", block.argument):
        return [f"{block.where}: `file` needs a file name"]
    if block.action in ("run", "node") and block.language not in CHECKED_LANGUAGES:
        return [f"{block.where}: only shell and Python blocks can be run"]
    if block.action in ("node", "install") and block.language not in SHELL_LANGUAGES:
        return [f"{block.where}: a node is started by a shell block"]
    return []


class BlockFailed(AssertionError):
    """A block did not do what the document says; the message names its line."""


class Session:
    """Runs one document's blocks in order, in a scratch directory, like one reader."""

    def __init__(self, document_path: Path, directory: Path, environment: dict[str, str],
                 examples: Path | None = None, *, fresh_clone: bool = False) -> None:
        self.document_path = document_path
        self.directory = directory
        self.environment = environment
        self.namespace: dict[str, object] = {"__name__": "__main__"}
        self.node: subprocess.Popen[bytes] | None = None
        self.node_logs: list[Path] = []
        self.node_exit_codes: list[int] = []
        self._last_output: str | None = None
        self.fresh_clone = fresh_clone
        if not fresh_clone:
            (directory / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
        if examples is not None:
            shutil.copytree(examples, directory / "examples",
                            ignore=shutil.ignore_patterns("__pycache__"))

    def run(self, block: Block) -> None:
        if block.action == "file":
            target = self.directory / block.argument
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.source)
        elif block.action == "node" or (block.action == "install" and self.fresh_clone):
            self.stop_node()
            self._start_node(block)
        elif block.action == "run":
            self._last_output = self._run(block)
        elif block.action == "output":
            self._compare(block)

    def _run(self, block: Block) -> str:
        if block.language in PYTHON_LANGUAGES:
            return self._run_python(block)
        completed = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", block.source], cwd=self.directory,
            env=self.environment, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        if completed.returncode != 0:
            raise BlockFailed(self._report(block, f"exit code {completed.returncode}",
                                           completed.stdout + completed.stderr))
        return completed.stdout

    def _run_python(self, block: Block) -> str:
        # Blank lines in front keep the document's line numbers in tracebacks.
        code = compile("\n" * block.line + block.source, str(self.document_path), "exec")
        printed = io.StringIO()
        with _environment(self.environment, self.directory), \
                contextlib.redirect_stdout(printed):
            exec(code, self.namespace)
        return printed.getvalue()

    def _compare(self, block: Block) -> None:
        if self._last_output is None:
            raise BlockFailed(f"{block.where}: an `output` block with no `run` block before it")
        printed = [line.rstrip() for line in self._last_output.strip().splitlines()]
        expected = [line.rstrip() for line in block.source.strip().splitlines()]
        if printed != expected:
            raise BlockFailed(f"{block.where}: the block before it printed\n"
                              + "\n".join(printed) + "\nnot\n" + "\n".join(expected))

    def _start_node(self, block: Block) -> None:
        log_path = self.directory / f"node-{len(self.node_logs) + 1}.log"
        self.node_logs.append(log_path)
        with log_path.open("wb") as log:
            # A session of its own: the node and its workers are one group to signal.
            self.node = subprocess.Popen(
                ["bash", "-c", block.source], cwd=self.directory, env=self.environment,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + (
            INSTALL_READY_TIMEOUT_S if block.action == "install" else NODE_READY_TIMEOUT_S)
        while not self._node_ready():
            if self.node.poll() is not None:
                raise BlockFailed(self._report(block, f"the node exited with code "
                                               f"{self.node.returncode}", ""))
            if time.monotonic() > deadline:
                raise BlockFailed(self._report(block, "the node was not ready in time", ""))
            time.sleep(0.1)

    def _node_ready(self) -> bool:
        url = f"http://{self.environment['ORCH8_BIND']}/health/ready"
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop_node(self) -> None:
        """Ctrl-C, as the reader would; its exit code is kept for the test to check."""
        if self.node is None:
            return
        node, self.node = self.node, None
        os.killpg(node.pid, signal.SIGINT)
        try:
            self.node_exit_codes.append(node.wait(timeout=NODE_STOP_TIMEOUT_S))
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
            raise BlockFailed("the node did not stop on SIGINT") from None

    def kill(self) -> None:
        """Teardown after a failure: nothing of the node may outlive the test."""
        if self.node is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.node.pid, signal.SIGKILL)
            self.node.wait()
            self.node = None

    def _report(self, block: Block, what: str, printed: str) -> str:
        node_log = self.node_logs[-1].read_text(errors="replace") if self.node_logs else ""
        return (f"{self.document_path.name} {block.where}: {what}\n--- block ---\n"
                f"{block.source}--- printed ---\n{printed}\n--- node log (end) ---\n"
                f"{node_log[-3000:]}")


@contextlib.contextmanager
def _environment(environment: dict[str, str], directory: Path) -> Iterator[None]:
    """Python blocks run in this process: give them the document's environment and cwd."""
    saved, cwd = dict(os.environ), os.getcwd()
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved)
