"""The `orch8` command line.

Exit codes: 0 ok, 1 the operation failed, 2 the command was used wrongly. Errors are one
line on stderr; no traceback reaches the terminal.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from orch8.config import Settings
from orch8.database import redact, resolve_dsn
from orch8.errors import Orch8Error

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """The command line itself is wrong (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="orch8", description="Drive an orch8 cluster.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    migrate = commands.add_parser("migrate", help="apply database migrations and exit")
    migrate.set_defaults(run=run_migrate)
    return parser


def run_migrate(args: argparse.Namespace) -> int:
    from orch8.migrate import migrate

    settings = Settings.from_environ()
    applied = migrate(resolve_dsn(settings.database_url, settings.data_dir))
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
        if run is None:
            raise UsageError("a command is required (see orch8 --help)")
        return run(args)
    except UsageError as error:
        print(f"orch8: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Orch8Error as error:
        print(f"orch8: {redact(str(error))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    except Exception as error:  # a last resort: one line, never a traceback
        print(f"orch8: {type(error).__name__}: {redact(str(error))}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
