"""What a handler sees of the instance it runs for."""

from __future__ import annotations

import uuid
from typing import Any, NamedTuple


class StepContext(NamedTuple):
    """Immutable. A named tuple, not a frozen dataclass: one is made for every step run,
    and a named tuple is four times cheaper to build."""

    instance_id: uuid.UUID
    sequence: str
    step_id: str
    # 1 on the first try, 2 on the first retry, ...
    attempt: int
    input: dict[str, Any]
    # Outputs of the steps that finished before this one, by step id.
    steps: dict[str, Any]
