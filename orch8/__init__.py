"""orch8: a durable workflow engine whose only shared state is PostgreSQL."""

from orch8.client import Client, enqueue, enqueue_many
from orch8.handlers import HandlerError, StepContext, handler
from orch8.model import Priority, State

__all__ = ["Client", "HandlerError", "Priority", "State", "StepContext", "enqueue", "enqueue_many",
           "handler"]
__version__ = "0.1.0"
