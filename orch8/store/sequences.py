"""The `sequences` table: versioned, immutable workflow definitions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from orch8.errors import NotFound
from orch8.model import Step, steps_from_json
from orch8.store.query import Query, Row


@dataclass(frozen=True)
class Sequence:
    name: str
    version: int
    steps: tuple[Step, ...]
    created_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "steps": [step.as_json() for step in self.steps],
            "created_at": self.created_at.isoformat(),
        }


def _sequence(row: Row) -> Sequence:
    return Sequence(row["name"], row["version"], steps_from_json(row["steps"]), row["created_at"])


# The next version is computed in the same statement; two writers racing on one name both
# compute the same number and the primary key refuses the second (Conflict: try again).
CREATE = """
INSERT INTO sequences (name, version, steps)
SELECT %(name)s, coalesce(max(version), 0) + 1, %(steps)s::jsonb
FROM sequences WHERE name = %(name)s
RETURNING name, version, steps, created_at
"""


def create_sequence(name: str, steps: tuple[Step, ...]) -> Query[Sequence]:
    """Store a validated definition as the next version of `name`."""
    body = orjson.dumps([step.as_json() for step in steps]).decode()
    return Query(CREATE, {"name": name, "steps": body}, lambda rows: _sequence(rows[0]))


GET = """
SELECT name, version, steps, created_at FROM sequences
WHERE name = %(name)s AND (%(version)s::int IS NULL OR version = %(version)s::int)
ORDER BY version DESC
LIMIT 1
"""


def get_sequence(name: str, version: int | None = None) -> Query[Sequence]:
    """The latest version of `name`, or the given one; `NotFound` if there is none."""

    def read(rows: list[Row]) -> Sequence:
        if not rows:
            shown = name if version is None else f"{name} version {version}"
            raise NotFound(f"no sequence {shown}")
        return _sequence(rows[0])

    return Query(GET, {"name": name, "version": version}, read)


LIST_LATEST = """
SELECT DISTINCT ON (name) name, version, steps, created_at FROM sequences
ORDER BY name, version DESC
"""


def list_sequences() -> Query[list[Sequence]]:
    """The latest version of every sequence, by name."""
    return Query(LIST_LATEST, {}, lambda rows: [_sequence(row) for row in rows])
