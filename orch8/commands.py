"""What each `orch8` command does: one function per command, given its arguments and a node.

Each returns the exit code. Results go to stdout (a table, or JSON with `--json`);
progress of a `--wait` goes to stderr, so `--json` output stays parseable.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import orjson

from orch8 import tables
from orch8.remote import Remote, RemoteError

EXIT_OK, EXIT_FAILED = 0, 1
POLL_S = 0.25
TERMINAL_STATES = ("completed", "failed", "cancelled")


class CommandUsageError(Exception):
    """The arguments parsed, but cannot be used (an unreadable FILE): exit 2."""


def _show(args: argparse.Namespace, value: Any, text: str) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(text)


def _segment(value: str) -> str:
    """A path segment, quoted so a name or id can never change the path."""
    return urllib.parse.quote(value, safe="")


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- cluster ---------------------------------------------------------------------------

NODE_COLUMNS = ("id", "state", "hostname", "workers", "instances_claimed", "last_heartbeat")


def nodes(args: argparse.Namespace, remote: Remote) -> int:
    rows = remote.get("/cluster/nodes")  # a list of nodes
    _show(args, rows, tables.render(rows, NODE_COLUMNS))
    return EXIT_OK


def drain(args: argparse.Namespace, remote: Remote) -> int:
    answer = remote.post(f"/cluster/nodes/{_segment(args.node)}/drain")
    if not args.wait:
        _show(args, answer or {"node": args.node, "draining": True},
              f"node {args.node} is draining")
        return EXIT_OK
    deadline = time.monotonic() + args.timeout
    last = None
    while time.monotonic() < deadline:
        try:
            node = _find_node(remote, args.node)
        except RemoteError as error:
            # Draining the very node we talk to: once it has left, its API is gone too.
            if error.status is not None or last is None:
                raise
            node = None
        # A node that has left deregistered (no row); one that died is marked "dead".
        if node is None or node["state"] == "dead":
            _show(args, {"node": args.node, "left": True}, f"node {args.node} has left")
            return EXIT_OK
        shown = f"{args.node}: {node['state']}, {node['instances_claimed']} instances claimed"
        if shown != last:
            _progress(shown)
            last = shown
        time.sleep(POLL_S)
    raise RemoteError(f"node {args.node} has not left after {args.timeout:g}s")


def _find_node(remote: Remote, node_id: str) -> dict[str, Any] | None:
    rows: list[dict[str, Any]] = remote.get("/cluster/nodes")
    return next((row for row in rows if row["id"] == node_id), None)


def queue(args: argparse.Namespace, remote: Remote) -> int:
    depth = remote.get("/queue")
    rows = [{"priority": name, "due": count} for name, count in depth["by_priority"].items()]
    rows.append({"priority": "total", "due": depth["due"]})
    _show(args, depth, tables.render(rows, ("priority", "due")))
    return EXIT_OK


# --- sequences -------------------------------------------------------------------------

SEQUENCE_COLUMNS = ("name", "version", "steps", "created_at")


def _sequence_row(sequence: dict[str, Any]) -> dict[str, Any]:
    return {**sequence, "steps": len(sequence["steps"])}


def apply_sequences(args: argparse.Namespace, remote: Remote) -> int:
    definitions = _read_definitions(args.file)
    stored = [remote.post("/sequences", definition) for definition in definitions]
    rows = [_sequence_row(sequence) for sequence in stored]
    _show(args, stored, tables.render(rows, SEQUENCE_COLUMNS))
    return EXIT_OK


def _read_definitions(file: str) -> list[Any]:
    """One definition or a list of them, from a JSON file (or stdin for `-`)."""
    try:
        raw = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as error:
        raise CommandUsageError(f"cannot read {file}: {error.strerror}") from None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise CommandUsageError(f"{file} is not valid JSON: {error}") from None
    definitions = value if isinstance(value, list) else [value]
    if not definitions:
        raise CommandUsageError(f"{file} holds no sequence")
    return definitions


def list_sequences(args: argparse.Namespace, remote: Remote) -> int:
    found = remote.get("/sequences")["sequences"]
    _show(args, found, tables.render([_sequence_row(item) for item in found], SEQUENCE_COLUMNS))
    return EXIT_OK


def get_sequence(args: argparse.Namespace, remote: Remote) -> int:
    found = remote.get(f"/sequences/{_segment(args.name)}", {"version": args.version})
    steps = tables.render(found["steps"], ("id", "handler", "params"))
    _show(args, found, f"{found['name']} version {found['version']}\n\n{steps}")
    return EXIT_OK


# --- instances -------------------------------------------------------------------------

INSTANCE_COLUMNS = ("id", "sequence", "version", "state", "step_index", "attempt",
                    "created_at")
INSTANCE_FIELDS = ("id", "sequence", "version", "state", "priority", "step_index", "attempt",
                   "last_error", "created_at", "updated_at", "finished_at", "input", "outputs")


def run(args: argparse.Namespace, remote: Remote) -> int:
    body: dict[str, Any] = {"sequence": args.sequence, "input": args.input}
    if args.priority:
        body["priority"] = args.priority
    if args.idempotency_key:
        body["idempotency_key"] = args.idempotency_key
    if args.delay_ms:
        body["delay_ms"] = args.delay_ms
    created = remote.post("/instances", body)
    if not args.wait:
        note = " (already started with this idempotency key)" if created["deduplicated"] else ""
        _show(args, created, f"{created['id']}{note}")
        return EXIT_OK
    finished = _follow(remote, created["id"], args.timeout)
    _show(args, finished, tables.render_record(finished, INSTANCE_FIELDS))
    return EXIT_OK if finished["state"] == "completed" else EXIT_FAILED


def _follow(remote: Remote, instance_id: str, timeout_s: float) -> dict[str, Any]:
    """Poll until the instance finishes, reporting each change of state or step on stderr."""
    started = time.monotonic()
    last = None
    while True:
        instance: dict[str, Any] = remote.get(f"/instances/{_segment(instance_id)}")
        shown = (f"{instance['state']}, step {instance['step_index']}, "
                 f"attempt {instance['attempt']}")
        if shown != last:
            _progress(f"[{time.monotonic() - started:5.1f}s] {instance_id}: {shown}")
            last = shown
        if instance["state"] in TERMINAL_STATES:
            return instance
        if time.monotonic() - started > timeout_s:
            raise RemoteError(f"instance {instance_id} still {instance['state']} "
                              f"after {timeout_s:g}s")
        time.sleep(POLL_S)


def list_instances(args: argparse.Namespace, remote: Remote) -> int:
    page = remote.get("/instances", {
        "state": args.state, "sequence": args.sequence,
        "concurrency_key": args.concurrency_key, "limit": args.limit, "before": args.before,
    })
    text = tables.render(page["instances"], INSTANCE_COLUMNS)
    if page["next"]:
        text += f"\n(more: --before {page['next']})"
    _show(args, page, text)
    return EXIT_OK


def get_instance(args: argparse.Namespace, remote: Remote) -> int:
    found = remote.get(f"/instances/{_segment(args.id)}")
    _show(args, found, tables.render_record(found, INSTANCE_FIELDS))
    return EXIT_OK


def cancel_instance(args: argparse.Namespace, remote: Remote) -> int:
    found = remote.post(f"/instances/{_segment(args.id)}/cancel")
    _show(args, found, f"{found['id']} {found['state']}")
    return EXIT_OK


def retry_instance(args: argparse.Namespace, remote: Remote) -> int:
    found = remote.post(f"/instances/{_segment(args.id)}/retry")
    _show(args, found, f"{found['id']} {found['state']}")
    return EXIT_OK


# --- rate limits -----------------------------------------------------------------------

LIMIT_COLUMNS = ("handler", "max", "window_ms", "calls_in_window")


def set_rate_limit(args: argparse.Namespace, remote: Remote) -> int:
    stored = remote.put(f"/rate-limits/{_segment(args.handler)}",
                        {"max": args.max, "window_ms": args.window_ms})
    _show(args, stored, tables.render([stored], LIMIT_COLUMNS))
    return EXIT_OK


def list_rate_limits(args: argparse.Namespace, remote: Remote) -> int:
    found = remote.get("/rate-limits")["rate_limits"]
    _show(args, found, tables.render(found, LIMIT_COLUMNS))
    return EXIT_OK


def delete_rate_limit(args: argparse.Namespace, remote: Remote) -> int:
    remote.delete(f"/rate-limits/{_segment(args.handler)}")
    _show(args, {"handler": args.handler, "deleted": True},
          f"rate limit on {args.handler} removed")
    return EXIT_OK


def seconds_argument(raw: str) -> float:
    """An argparse type: a number of seconds in (0, 86400], or a one-line usage error."""
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds (0-86400]")
    return value
