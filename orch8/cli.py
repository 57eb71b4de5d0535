"""The `orch8` command line: drive a node over its HTTP API, or migrate the database.

    orch8 nodes | drain NODE [--wait] | queue
    orch8 sequences apply FILE | list | get NAME [--version N]
    orch8 run SEQUENCE [--input JSON] [--priority P] [--delay-ms MS] [--wait]
    orch8 instances list [--state S] | get ID | cancel ID | retry ID
    orch8 rate-limits set HANDLER --max N --window-ms MS | list | delete HANDLER
    orch8 rollout NODE=URL... --restart COMMAND [--min-ready N] [--dry-run]
    orch8 migrate

The node is `ORCH8_URL` (default http://127.0.0.1:8080) or `--url`; the token comes from
`ORCH8_API_TOKEN` only, never a flag, so it stays out of shell history and `ps`.
Output is a table by default, JSON with `--json`. Exit codes: 0 ok, 1 the operation
failed (including a run that ended failed or cancelled), 2 the command was used wrongly.
Errors are one line on stderr; no traceback reaches the terminal.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import psycopg

from orch8 import commands, rollout
from orch8.commands import seconds_argument
from orch8.config import Settings
from orch8.database import redact, resolve_dsn
from orch8.errors import Orch8Error
from orch8.remote import Remote, is_http_url

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """The command line itself is wrong (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _common() -> argparse.ArgumentParser:
    """Options every remote command takes, after its own name."""
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_argument("--url", help="the node's API (default $ORCH8_URL or "
                                      "http://127.0.0.1:8080)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="orch8", description="Drive an orch8 cluster.")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = [_common()]
    _add_cluster(top, common)
    _add_sequences(top, common)
    _add_instances(top, common)
    _add_rate_limits(top, common)
    rollout.add_command(top)
    migrate = top.add_parser("migrate", help="apply database migrations and exit")
    migrate.set_defaults(run=run_migrate)
    return parser


def _add_cluster(top: Any, common: list[argparse.ArgumentParser]) -> None:
    nodes = top.add_parser("nodes", parents=common, help="list the cluster's nodes")
    nodes.set_defaults(run=commands.nodes)
    drain = top.add_parser("drain", parents=common, help="drain a node (stop claiming, leave)")
    drain.add_argument("node", metavar="NODE")
    drain.add_argument("--wait", action="store_true", help="return once the node has left")
    drain.add_argument("--timeout", type=seconds_argument, default=600.0, metavar="SECONDS")
    drain.set_defaults(run=commands.drain)
    queue = top.add_parser("queue", parents=common, help="due instances, by priority")
    queue.set_defaults(run=commands.queue)


def _add_sequences(top: Any, common: list[argparse.ArgumentParser]) -> None:
    sequences = top.add_parser("sequences", help="workflow definitions")
    verbs = sequences.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    apply = verbs.add_parser("apply", parents=common, help="store definitions from JSON")
    apply.add_argument("file", metavar="FILE", help="a JSON sequence or list of them; - = stdin")
    apply.set_defaults(run=commands.apply_sequences)
    listing = verbs.add_parser("list", parents=common, help="latest version of each")
    listing.set_defaults(run=commands.list_sequences)
    get = verbs.add_parser("get", parents=common, help="one sequence")
    get.add_argument("name", metavar="NAME")
    get.add_argument("--version", type=_positive, metavar="N")
    get.set_defaults(run=commands.get_sequence)


def _add_instances(top: Any, common: list[argparse.ArgumentParser]) -> None:
    run = top.add_parser("run", parents=common, help="start an instance of a sequence")
    run.add_argument("sequence", metavar="SEQUENCE")
    run.add_argument("--input", type=_json_object, default={}, metavar="JSON")
    run.add_argument("--priority", choices=["low", "normal", "high", "critical"])
    run.add_argument("--idempotency-key", metavar="KEY")
    run.add_argument("--delay-ms", type=_positive, metavar="MS", help="start this much later")
    run.add_argument("--wait", action="store_true", help="follow it until it finishes")
    run.add_argument("--timeout", type=seconds_argument, default=600.0, metavar="SECONDS")
    run.set_defaults(run=commands.run)
    instances = top.add_parser("instances", help="workflow runs")
    verbs = instances.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    listing = verbs.add_parser("list", parents=common, help="newest first")
    listing.add_argument("--state", choices=["scheduled", "running", "completed", "failed",
                                             "cancelled"])
    listing.add_argument("--sequence")
    listing.add_argument("--concurrency-key")
    listing.add_argument("--limit", type=_positive, default=50)
    listing.add_argument("--before", metavar="ID", help="the page after this id")
    listing.set_defaults(run=commands.list_instances)
    for verb, action, text in (("get", commands.get_instance, "one instance and its outputs"),
                               ("cancel", commands.cancel_instance, "cancel a run"),
                               ("retry", commands.retry_instance, "retry a failed run")):
        command = verbs.add_parser(verb, parents=common, help=text)
        command.add_argument("id", metavar="ID")
        command.set_defaults(run=action)


def _add_rate_limits(top: Any, common: list[argparse.ArgumentParser]) -> None:
    limits = top.add_parser("rate-limits", help="per-handler rate limits")
    verbs = limits.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    put = verbs.add_parser("set", parents=common, help="allow MAX calls per window")
    put.add_argument("handler", metavar="HANDLER")
    put.add_argument("--max", type=_positive, required=True, metavar="N")
    put.add_argument("--window-ms", type=_positive, required=True, metavar="MS")
    put.set_defaults(run=commands.set_rate_limit)
    listing = verbs.add_parser("list", parents=common, help="every limit")
    listing.set_defaults(run=commands.list_rate_limits)
    delete = verbs.add_parser("delete", parents=common, help="remove a handler's limit")
    delete.add_argument("handler", metavar="HANDLER")
    delete.set_defaults(run=commands.delete_rate_limit)


def _json_object(raw: str) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _positive(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 2**31 - 1:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a positive integer")
    return int(raw)


def run_migrate(args: argparse.Namespace) -> int:
    from orch8.migrate import migrate

    settings = Settings.from_environ()
    try:
        applied = migrate(resolve_dsn(settings.database_url, settings.data_dir))
    except psycopg.Error as error:
        raise Orch8Error(f"cannot migrate the database: {error}") from None
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        run: Callable[..., int] | None = getattr(args, "run", None)
        if run is None:
            raise UsageError("a command is required (see orch8 --help)")
        if run is run_migrate:
            return run(args)
        if args.url is not None and not is_http_url(args.url):
            raise UsageError(f"--url: must be an http:// or https:// address, not {args.url!r}")
        return run(args, Remote(args.url))
    except (UsageError, commands.CommandUsageError) as error:
        _say(str(error))
        return EXIT_USAGE
    except Orch8Error as error:
        _say(str(error))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    except Exception as error:  # a last resort: one line, never a traceback
        _say(f"unexpected error: {error}")
        return EXIT_FAILED


def _say(message: str) -> None:
    """One line on stderr, password-free (psycopg's messages span several lines)."""
    print(f"orch8: {redact(' '.join(message.split()))}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
