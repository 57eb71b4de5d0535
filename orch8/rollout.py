"""`orch8 rollout`: restart a cluster's nodes one at a time, keeping enough of them ready.

For each node, in the order given:

1. refuse to go on unless at least `--min-ready` *other* nodes are ready: a listed node
   answers 200 on `/health/ready`; a registered node that was not listed (no address to
   ask) counts when `/cluster/nodes` shows it `active`;
2. drain it (`POST /cluster/nodes/{id}/drain`) and wait until its `/health/ready` no longer
   answers 200 and it has left `/cluster/nodes` (it deregisters once its in-flight steps
   are done); past `--drain-timeout` the rollout stops, the node still draining;
3. run the restart command (`--restart`, a shell command with `{node}`, `{host}` and `{url}`
   filled in, each shell-quoted); a non-zero exit stops the rollout;
4. wait until the node is ready again as a new incarnation (registered `active` with a
   later `started_at`); past `--ready-timeout` the rollout stops.

The rollout stops at the first node that fails any step and leaves the rest untouched.
Progress goes to stderr; the result (a table, or JSON with `--json`) to stdout.
"""

from __future__ import annotations

import argparse
import shlex
import string
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from orch8 import tables
from orch8.commands import CommandUsageError, seconds_argument
from orch8.errors import Orch8Error
from orch8.remote import Remote, RemoteError

EXIT_OK, EXIT_FAILED = 0, 1
POLL_S = 0.25
PLACEHOLDERS = ("node", "host", "url")
# States in which a node has left the cluster for good (dead rows stay listed an hour).
GONE_STATES = ("dead",)


class RolloutError(Orch8Error):
    """The rollout stopped: a refusal, a timeout, or a failed restart command."""


@dataclass(frozen=True)
class Target:
    """A node to restart and the address of its API."""

    node_id: str
    url: str

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or ""


@dataclass(frozen=True)
class Plan:
    targets: tuple[Target, ...]
    restart: str
    min_ready: int
    drain_timeout_s: float
    ready_timeout_s: float
    restart_timeout_s: float


@dataclass(frozen=True)
class Restarted:
    """One node rolled: how long each phase took, and its incarnation before and after."""

    node: str
    url: str
    command: str
    drained_s: float
    restarted_s: float
    ready_s: float
    started_at_before: str
    started_at_after: str


# --- the command line --------------------------------------------------------------------


def add_command(top: Any) -> None:
    """Register `orch8 rollout` under the command line's subcommands."""
    rollout = top.add_parser(
        "rollout", help="restart nodes one at a time (drain, restart, wait until ready)",
        description="Restart each NODE=URL in turn: drain it through its API, wait until it "
                    "has left, run the --restart command, wait until it is ready again.")
    add = rollout.add_argument
    add("targets", nargs="+", type=parse_target, metavar="NODE=URL",
        help="a node id and its API address, e.g. node-1=http://10.0.0.1:8080")
    add("--restart", required=True, type=parse_template, metavar="COMMAND",
        help="shell command restarting one node; {node}, {host} and {url} are filled in, "
             "e.g. 'ssh {host} sudo systemctl restart orch8'")
    add("--min-ready", type=_count, default=1, metavar="N",
        help="other nodes that must be ready before a node is drained (default 1)")
    add("--drain-timeout", type=seconds_argument, default=330.0, metavar="SECONDS",
        help="longest wait for a drained node to leave (default 330)")
    add("--ready-timeout", type=seconds_argument, default=120.0, metavar="SECONDS",
        help="longest wait for a restarted node to be ready (default 120)")
    add("--restart-timeout", type=seconds_argument, default=600.0, metavar="SECONDS",
        help="longest run of the restart command (default 600)")
    add("--dry-run", action="store_true", help="show the plan and each node's readiness; "
                                               "drain and restart nothing")
    add("--json", action="store_true", help="print JSON instead of a table")
    # The command line hands every command a Remote for --url; a rollout talks to each
    # node at its own address instead.
    rollout.set_defaults(run=run, url=None)


def parse_target(raw: str) -> Target:
    node_id, sep, url = raw.partition("=")
    if not sep or not node_id or not url:
        raise argparse.ArgumentTypeError(f"{raw!r} is not NODE=URL")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{url!r} is not an http(s) URL")
    return Target(node_id, url.rstrip("/"))


def parse_template(raw: str) -> str:
    try:
        names = [field for _, field, _, _ in string.Formatter().parse(raw) if field is not None]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"bad restart command: {error}") from None
    unknown = sorted(set(names) - set(PLACEHOLDERS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown placeholder {{{unknown[0]}}} (use {{node}}, {{host}} or {{url}}; "
            "write {{ and }} for literal braces)")
    return raw


def _count(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or int(raw) > 1000:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a count (0-1000)")
    return int(raw)


def run(args: argparse.Namespace, _remote: Remote) -> int:
    """`orch8 rollout`: returns the exit code."""
    targets = tuple(args.targets)
    seen = [t.node_id for t in targets]
    duplicate = next((node for node in seen if seen.count(node) > 1), None)
    if duplicate is not None:
        raise CommandUsageError(f"node {duplicate} is listed twice")
    plan = Plan(targets, args.restart, args.min_ready, args.drain_timeout,
                args.ready_timeout, args.restart_timeout)
    rollout = Rollout(plan, _progress)
    if args.dry_run:
        rows = rollout.dry_run()
        _show(args, {"dry_run": True, "nodes": rows},
              tables.render(rows, ("node", "url", "ready", "command")))
        return EXIT_OK
    try:
        rollout.run()
    except RolloutError as error:
        if args.json:
            _show(args, rollout.summary(str(error)), "")
        raise
    rows = [asdict(done) for done in rollout.done]
    _show(args, rollout.summary(None), tables.render(
        rows, ("node", "drained_s", "restarted_s", "ready_s", "started_at_after")))
    return EXIT_OK


def _show(args: argparse.Namespace, value: Any, text: str) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif text:
        print(text)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the rollout -------------------------------------------------------------------------


class Rollout:
    """Rolls `plan.targets` in order; `done` lists the nodes finished so far."""

    def __init__(self, plan: Plan, progress: Callable[[str], None]) -> None:
        self.plan = plan
        self.done: list[Restarted] = []
        self._progress = progress
        self._remotes = {t.node_id: Remote(t.url) for t in plan.targets}
        self._started = time.monotonic()

    def run(self) -> None:
        """Roll every target; raise `RolloutError` at the first one that fails."""
        for target in self.plan.targets:
            self.done.append(self.roll(target))

    def roll(self, target: Target) -> Restarted:
        """Drain, restart and wait for one node (see the module docstring)."""
        self._check_others_ready(target)
        before = self._registered(target)
        phase_start = time.monotonic()
        self._say(target, f"draining (started {before['started_at']})")
        self._remotes[target.node_id].post(f"/cluster/nodes/{_segment(target.node_id)}/drain")
        self._await_left(target)
        drained = time.monotonic()
        command = self.command_for(target)
        self._say(target, f"left the cluster; running: {command}")
        self._run_restart(target, command)
        restarted = time.monotonic()
        after = self._await_new_incarnation(target, before["started_at"])
        ready = time.monotonic()
        self._say(target, f"ready again (started {after['started_at']})")
        return Restarted(target.node_id, target.url, command,
                         round(drained - phase_start, 3), round(restarted - drained, 3),
                         round(ready - restarted, 3), before["started_at"], after["started_at"])

    def command_for(self, target: Target) -> str:
        """The restart command for `target`, every placeholder shell-quoted."""
        return self.plan.restart.format(node=shlex.quote(target.node_id),
                                        host=shlex.quote(target.host),
                                        url=shlex.quote(target.url))

    def dry_run(self) -> list[dict[str, Any]]:
        """What a rollout would do, and which nodes are ready now; changes nothing."""
        return [{"node": t.node_id, "url": t.url, "ready": self._is_ready(t),
                 "command": self.command_for(t)} for t in self.plan.targets]

    def summary(self, error: str | None) -> dict[str, Any]:
        return {"restarted": [asdict(done) for done in self.done],
                "completed": len(self.done), "of": len(self.plan.targets), "error": error}

    # -- the steps -----------------------------------------------------------------------

    def _check_others_ready(self, target: Target) -> None:
        others = [t for t in self.plan.targets if t != target]
        ready = [t.node_id for t in others if self._is_ready(t)]
        listed = {t.node_id for t in self.plan.targets}
        view = self._cluster_view(target) or {}
        unlisted = [node for node, row in view.items()
                    if node not in listed and row.get("state") == "active"]
        count = len(ready) + len(unlisted)
        if count < self.plan.min_ready:
            names = ", ".join(ready + unlisted) or "none"
            raise RolloutError(
                f"refusing to drain {target.node_id}: {count} other node(s) ready ({names}), "
                f"--min-ready is {self.plan.min_ready}")

    def _registered(self, target: Target) -> dict[str, Any]:
        view = self._cluster_view(target)
        row = (view or {}).get(target.node_id)
        if row is None or row.get("state") != "active":
            state = "not registered" if row is None else row.get("state")
            raise RolloutError(f"node {target.node_id} is {state}; a rollout restarts active "
                               "nodes only")
        return row

    def _await_left(self, target: Target) -> None:
        deadline = time.monotonic() + self.plan.drain_timeout_s
        last = None
        while True:
            ready = self._is_ready(target)
            row = self._row_after_drain(target)
            if not ready and (row is None or row.get("state") in GONE_STATES):
                return
            shown = (f"{row.get('state')}, {row.get('instances_claimed')} instances claimed"
                     if row else "ready")
            if shown != last:
                self._say(target, shown)
                last = shown
            if time.monotonic() > deadline:
                raise RolloutError(
                    f"node {target.node_id} has not left after {self.plan.drain_timeout_s:g}s "
                    f"({shown}); stopping the rollout, the node is still draining")
            time.sleep(POLL_S)

    def _row_after_drain(self, target: Target) -> dict[str, Any] | None:
        view = self._cluster_view(target)
        if view is None:
            # No node answers: the target's API closes only after it has deregistered, so
            # with no other node to ask, silence from it means it has left.
            return None
        return view.get(target.node_id)

    def _run_restart(self, target: Target, command: str) -> None:
        try:
            # The command's own output goes to stderr with our progress, so that stdout
            # stays the result (and parseable with --json).
            finished = subprocess.run(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL,
                                      stdout=sys.stderr, timeout=self.plan.restart_timeout_s,
                                      check=False)
        except subprocess.TimeoutExpired:
            raise RolloutError(f"restart command for {target.node_id} still running after "
                               f"{self.plan.restart_timeout_s:g}s: {command}") from None
        if finished.returncode != 0:
            raise RolloutError(f"restart command for {target.node_id} failed with exit code "
                               f"{finished.returncode}: {command}; stopping the rollout")

    def _await_new_incarnation(self, target: Target, started_before: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.plan.ready_timeout_s
        while True:
            if self._is_ready(target):
                row = (self._cluster_view(target) or {}).get(target.node_id)
                if row and row.get("state") == "active" and row["started_at"] != started_before:
                    return row
            if time.monotonic() > deadline:
                raise RolloutError(f"node {target.node_id} is not ready "
                                   f"{self.plan.ready_timeout_s:g}s after its restart; "
                                   "stopping the rollout")
            time.sleep(POLL_S)

    # -- asking the nodes ------------------------------------------------------------------

    def _is_ready(self, target: Target) -> bool:
        try:
            self._remotes[target.node_id].get("/health/ready")
        except RemoteError:
            return False  # 503, or not answering at all
        return True

    def _cluster_view(self, target: Target) -> dict[str, dict[str, Any]] | None:
        """/cluster/nodes by id, asked of another listed node first (the target may be
        leaving), then of the target; None when no listed node answers."""
        order = [t for t in self.plan.targets if t != target] + [target]
        for node in order:
            try:
                rows = self._remotes[node.node_id].get("/cluster/nodes")
            except RemoteError as error:
                if error.status in (401, 403):
                    raise
                continue
            return {row["id"]: row for row in rows}
        return None

    def _say(self, target: Target, message: str) -> None:
        self._progress(f"[{time.monotonic() - self._started:6.1f}s] {target.node_id}: "
                       f"{message}")


def _segment(value: str) -> str:
    return urllib.parse.quote(value, safe="")
