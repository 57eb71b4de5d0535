import sys

import orch8

client = orch8.Client()          # or orch8.Client("postgresql://user:pass@host/db")
client.create_sequence("welcome", [
    {"id": "hello", "handler": "greet", "params": {"word": "Hello"},
     "retry": {"max_attempts": 5, "initial_backoff_ms": 500, "max_backoff_ms": 30000}},
    {"id": "wait", "handler": "noop", "delay_ms": 2000},        # a durable 2 s wait
    {"id": "say", "handler": "log",
     "params": {"message": "{{ steps.hello.greeting }} from {{ input.team }}"}},
])
started = client.start("welcome", {"name": "Ada", "team": "platform"},
                       priority="high", idempotency_key="signup-ada")
finished = client.wait(started.id)
if finished.state != orch8.State.COMPLETED:
    sys.exit(f"{finished.state}: {finished.last_error}")
print(finished.outputs["say"]["message"])
