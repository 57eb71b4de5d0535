"""The supervisor-worker pipe protocol, and the small pure parts of worker slots."""

from __future__ import annotations

import pytest

from supervisor.protocol import BootFailed, Drain, Hurry, ProtocolError, Report, decode, encode
from supervisor.slots import describe_exit


@pytest.mark.parametrize("message", [
    Report(2, 1234, {"claimed": 3, "completed": 2}, 1, (0, 1, 2), 0.75, (1, 0), 0.01),
    Report(1, 99, {}, 0),
    BootFailed(1, "cannot load handler module 'x': No module named 'x'"),
    Drain(),
    Hurry(),
])
def test_every_message_survives_the_wire(message: object) -> None:
    assert decode(encode(message)) == message  # type: ignore[arg-type]


def test_a_frame_is_tagged_json() -> None:
    assert encode(Drain()) == b'{"tag":"drain"}'


@pytest.mark.parametrize("frame", [b"", b"not json", b"[]", b'{"tag":"reboot"}',
                                   b'{"tag":"report","slot":1}', b'{"no":"tag"}'])
def test_anything_else_is_a_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(frame)


@pytest.mark.parametrize(("code", "said"), [
    (0, "exited with code 0"), (1, "exited with code 1"), (3, "failed at boot"),
    (-9, "killed by SIGKILL"), (-15, "killed by SIGTERM"),
])
def test_exits_are_described_by_cause(code: int, said: str) -> None:
    assert describe_exit(code) == said

