"""What a supervisor and its workers say to each other over their pipe.

Each message is a frozen dataclass with a `tag`; on the wire it is one orjson object,
`{"tag": "report", ...fields}`, sent as one `send_bytes` frame. JSON rather than pickle:
a frame from a half-dead process can at worst fail to parse, never run code.

Worker -> supervisor: `Report` (every half second or so: proof of life plus counters)
and `BootFailed` (the worker cannot start; the node must stop rather than respawn).
Supervisor -> worker: `Drain` (stop claiming, finish in-flight steps, exit) and `Hurry`
(stop now: cancel what runs, release its claims, exit).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import orjson


@dataclass(frozen=True)
class Report:
    tag: ClassVar[str] = "report"
    slot: int
    pid: int
    counts: dict[str, int]
    in_flight: int
    # For the metrics histograms: what was observed since the previous report, as counts
    # per bucket (`orch8.engine.stats.STEP_BUCKETS`, `LATENESS_BUCKETS`) and their sum.
    step_buckets: tuple[int, ...] = ()
    step_seconds_sum: float = 0.0
    lateness_buckets: tuple[int, ...] = ()
    lateness_seconds_sum: float = 0.0


@dataclass(frozen=True)
class BootFailed:
    tag: ClassVar[str] = "boot_failed"
    slot: int
    message: str


@dataclass(frozen=True)
class Drain:
    tag: ClassVar[str] = "drain"


@dataclass(frozen=True)
class Hurry:
    tag: ClassVar[str] = "hurry"


Message = Report | BootFailed | Drain | Hurry

MESSAGES: dict[str, type[Any]] = {cls.tag: cls for cls in (Report, BootFailed, Drain, Hurry)}


class ProtocolError(Exception):
    """A frame that is not a message we know."""


def encode(message: Message) -> bytes:
    """One frame for `Connection.send_bytes`."""
    # The fields as they are (`asdict` would copy them, tuples element by element).
    return orjson.dumps({"tag": message.tag, **vars(message)})


def decode(frame: bytes) -> Message:
    """The message in one frame; `ProtocolError` if it is not one."""
    try:
        raw = orjson.loads(frame)
        cls = MESSAGES[raw.pop("tag")]
        values = {
            field.name: _tuple_if_listed(field.type, raw[field.name])
            for field in fields(cls) if field.name in raw
        }
        message: Message = cls(**values)
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ProtocolError(f"unreadable frame: {error!r}") from None
    return message


def _tuple_if_listed(annotation: Any, value: Any) -> Any:
    # JSON has no tuples; the dataclass declares them (annotations are strings here).
    if isinstance(value, list) and str(annotation).startswith("tuple"):
        return tuple(value)
    return value
