"""The process tree of one orch8 node: a supervisor and its worker processes.

- `main`: the `orch8-supervisor` command (flags over the environment, exit codes).
- `arbiter`: the supervisor itself: main loop, phases, drain and stop, the `NodeView`.
- `heartbeat`: heartbeat, stale sweep, re-registration and the drain listener.
- `slots`, `reaping`: worker processes, their deaths, claim release and restart backoff.
- `child`: the worker process's entry point.
- `protocol`: the messages on the pipe between the two.
- `signals`: the signal table; handlers that only record.
- `http`: the API served by hypercorn inside the supervisor.
- `systemd`: readiness notifications when run as a `Type=notify` unit.

`orch8/` never imports this package: the library knows nothing of processes.
"""
