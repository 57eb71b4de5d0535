"""The handler of `fan_out.py`: tell an HTTP endpoint about one account's event.

A node runs it: `ORCH8_HANDLERS=fan_out_handlers` (see fan_out.py).
"""

import json
import urllib.request

import orch8


@orch8.handler("notify_account")
def notify_account(ctx, params):
    """POST the event to the URL in the instance's input; the reply is the step's output."""
    event = {"account": ctx.input["account"], "event": ctx.input["event"]}
    request = urllib.request.Request(
        ctx.input["url"], data=json.dumps(event).encode(), method="POST",
        # A step may run twice (at-least-once): this key lets the receiver drop a repeat.
        headers={"Content-Type": "application/json",
                 "Idempotency-Key": f"{ctx.instance_id}/{ctx.step_id}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)
