"""Fan out: one instance per (account, event), each calling an HTTP endpoint.

Two limits hold across every node and worker of the cluster:
- a concurrency key per account with `max_concurrency=1`: one call per account at a time,
  so an account's events never race each other;
- a rate limit on the `notify_account` handler: at most LIMIT calls per WINDOW_MS, as an
  external API would demand.

The endpoint is started here, on a free local port, and records what it receives, so the
program can show both limits from the receiving side. It needs a node that runs the
handler, started from this directory:

    ORCH8_HANDLERS=fan_out_handlers ../.venv/bin/orch8-supervisor --workers 2
    ../.venv/bin/python fan_out.py          # in another terminal

It exits 1 if an instance did not complete or an account had two calls at once.
"""

import collections
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orch8

ACCOUNTS, EVENTS_PER_ACCOUNT = 10, 3
LIMIT, WINDOW_MS = 5, 1000
# Workers re-read the set of rate limits every 2 s: give a limit set just now time to
# reach them all before the first call (a durable delay, not a sleep in this program).
LIMIT_SETTLES_MS = 2100


class Recorder:
    """What the endpoint saw: arrival times, and the most calls in progress per account."""

    def __init__(self):
        self.lock = threading.Lock()
        self.arrivals = []
        self.in_progress = collections.Counter()
        self.most_at_once = 0

    def begin(self, account):
        with self.lock:
            self.arrivals.append(time.monotonic())
            self.in_progress[account] += 1
            self.most_at_once = max(self.most_at_once, self.in_progress[account])

    def end(self, account):
        with self.lock:
            self.in_progress[account] -= 1

    def busiest_window(self, seconds):
        """The most arrivals in any window of `seconds`, wherever it starts."""
        times = sorted(self.arrivals)
        first = 0
        most = 0
        for last, arrived in enumerate(times):
            while arrived - times[first] >= seconds:
                first += 1
            most = max(most, last - first + 1)
        return most


class Endpoint(BaseHTTPRequestHandler):
    def do_POST(self):
        event = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        recorder = self.server.recorder
        recorder.begin(event["account"])
        try:
            time.sleep(0.05)  # the work; two calls of one account at once would overlap here
        finally:
            recorder.end(event["account"])
        reply = json.dumps({"received": event}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format, *args):
        pass  # quiet: the summary at the end says what happened


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    server.recorder = Recorder()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/events"

    with orch8.Client() as client:
        client.set_rate_limit("notify_account", max_calls=LIMIT, window_ms=WINDOW_MS)
        client.create_sequence("notify-account", [
            {"id": "notify", "handler": "notify_account",
             "retry": {"max_attempts": 5, "initial_backoff_ms": 200}},
        ])
        started = client.start_many([
            {"sequence": "notify-account", "input": {"account": account, "event": event,
                                                     "url": url},
             "concurrency_key": f"account-{account}", "max_concurrency": 1,
             "delay_ms": LIMIT_SETTLES_MS}
            for account in range(ACCOUNTS) for event in range(EVENTS_PER_ACCOUNT)
        ])
        states = collections.Counter(
            str(client.wait(created.id, timeout_s=120).state) for created in started)
    server.shutdown()

    recorder = server.recorder
    print(f"{len(started)} instances: {dict(states)}")
    print(f"most calls at once for one account: {recorder.most_at_once} (key cap 1)")
    print(f"most calls received in any {WINDOW_MS} ms: "
          f"{recorder.busiest_window(WINDOW_MS / 1000)} (rate limit {LIMIT})")
    ok = states == {"completed": len(started)} and recorder.most_at_once == 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
