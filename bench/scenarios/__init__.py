"""One module per scenario, each with `measure(context) -> Run` and `plot(run)`."""

from __future__ import annotations

from types import ModuleType

from bench.scenarios import baseline, enqueue, latency, nodes, peers, scale, steps, throughput

# `all` runs them in this order.
SCENARIOS: dict[str, ModuleType] = {
    "throughput": throughput,
    "enqueue": enqueue,
    "latency": latency,
    "steps": steps,
    "scale": scale,
    "nodes": nodes,
    "baseline": baseline,
    "peers": peers,
}
