"""The node's HTTP API: health, cluster, workflows and metrics, in one Starlette app."""
