"""The project's error classes: few, each meaning one thing to the caller."""


class Orch8Error(Exception):
    """Base class for every error orch8 raises on purpose."""


class ConfigError(Orch8Error):
    """A setting is missing, unknown or out of range; start-up stops with its message."""


class DefinitionError(Orch8Error):
    """A sequence definition or instance request is invalid; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFound(Orch8Error):
    """The named sequence, instance or node does not exist."""


class Conflict(Orch8Error):
    """The request is valid but the current state does not allow it (cancel a finished run)."""
