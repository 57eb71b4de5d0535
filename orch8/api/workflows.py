"""The workflow endpoints: sequences, instances (one, a batch, the dead letter), the queue.

Handlers are thin: read and validate the request (`inputs`, `orch8.model`,
`orch8.requests`), run one store `Query` on the node's pool, shape the JSON. Errors are
raised and turned into responses by `orch8.api.errors`.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from orch8.api import inputs
from orch8.api.errors import ApiError, json_response
from orch8.api.node import NodeView, run_query
from orch8.api.routing import by_method
from orch8.errors import DefinitionError
from orch8.model import State, parse_name, parse_steps
from orch8.requests import parse_new_instance
from orch8.store import instances, sequences

# A batch is one transaction; past this size, callers should send several batches.
MAX_BATCH = 1000
MAX_PAGE = 1000
DEFAULT_PAGE = 100
SEQUENCE_FIELDS = {"name", "steps"}
LIST_FILTERS = {"state", "sequence", "concurrency_key", "before", "limit"}


class Workflows:
    """The endpoints of one node, bound to its pool."""

    def __init__(self, node: NodeView) -> None:
        self.node = node

    # --- sequences -------------------------------------------------------------------

    async def create_sequence(self, request: Request) -> Response:
        body = inputs.object_body(await inputs.read_json(request), SEQUENCE_FIELDS)
        name = parse_name(body.get("name"), "name")
        steps_body = body.get("steps")
        for index, step in enumerate(steps_body if isinstance(steps_body, list) else []):
            inputs.reject_nulls(step, f"steps[{index}].")
            if isinstance(step, dict):
                inputs.reject_nulls(step.get("retry"), f"steps[{index}].retry.")
        steps = parse_steps(steps_body)
        created = await run_query(self.node, sequences.create_sequence(name, steps))
        return json_response(created.as_json(), 201)

    async def list_sequences(self, request: Request) -> Response:
        inputs.check_query(request, set())
        found = await run_query(self.node, sequences.list_sequences())
        return json_response({"sequences": [sequence.as_json() for sequence in found]})

    async def get_sequence(self, request: Request) -> Response:
        inputs.check_query(request, {"version"})
        name = parse_name(request.path_params["name"], "name")
        version = inputs.query_int(request, "version", None, 1, 2**31 - 1)
        found = await run_query(self.node, sequences.get_sequence(name, version))
        return json_response(found.as_json())

    # --- instances -------------------------------------------------------------------

    async def create_instance(self, request: Request) -> Response:
        body = await inputs.read_json(request)
        inputs.reject_nulls(body)
        new = parse_new_instance(body)
        created = await run_query(self.node, instances.create_instance(new))
        answer = {"id": created.id, "deduplicated": created.deduplicated}
        return json_response(answer, 200 if created.deduplicated else 201)

    async def create_batch(self, request: Request) -> Response:
        raw = await inputs.read_json(request, inputs.MAX_BATCH_BODY_BYTES)
        body = inputs.object_body(raw, {"instances"})
        items = body.get("instances")
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
            raise ApiError(422, f"instances: must be a list of 1 to {MAX_BATCH} requests")
        parsed = [_parse_item(index, item) for index, item in enumerate(items)]
        # One transaction: every instance is created, or (on any error) none is.
        async with self.node.pool.connection() as conn, conn.transaction():
            created = await instances.create_instances(parsed).run_async(conn)
        shown = [{"id": item.id, "deduplicated": item.deduplicated} for item in created]
        return json_response({"instances": shown}, 201)

    async def list_instances(self, request: Request) -> Response:
        inputs.check_query(request, LIST_FILTERS)
        state = _state(request.query_params.get("state"))
        sequence = request.query_params.get("sequence") or None
        if sequence is not None:
            parse_name(sequence, "sequence")
        return await self._page(request, state=state, sequence=sequence,
                                concurrency_key=request.query_params.get("concurrency_key") or None)

    async def list_dead_letter(self, request: Request) -> Response:
        inputs.check_query(request, {"before", "limit", "sequence"})
        sequence = request.query_params.get("sequence") or None
        if sequence is not None:
            parse_name(sequence, "sequence")
        return await self._page(request, state=State.FAILED, sequence=sequence)

    async def _page(self, request: Request, **filters: Any) -> Response:
        limit = inputs.query_int(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE) or DEFAULT_PAGE
        before = inputs.query_uuid(request, "before")
        query = instances.list_instances(before=before, limit=limit, **filters)
        found = await run_query(self.node, query)
        # A full page may have more behind it: `next` is the cursor for it.
        after = str(found[-1].id) if found and len(found) == limit else None
        return json_response({"instances": [item.as_json() for item in found], "next": after})

    async def get_instance(self, request: Request) -> Response:
        instance_id = request.path_params["id"]
        found = await run_query(self.node, instances.get_instance(instance_id))
        return json_response(found.as_json())

    async def cancel_instance(self, request: Request) -> Response:
        instance_id = request.path_params["id"]
        await run_query(self.node, instances.cancel_instance(instance_id))
        instance = await run_query(self.node, instances.get_instance(instance_id))
        return json_response(instance.as_json())

    async def retry_instance(self, request: Request) -> Response:
        instance_id = request.path_params["id"]
        await run_query(self.node, instances.retry_instance(instance_id))
        instance = await run_query(self.node, instances.get_instance(instance_id))
        return json_response(instance.as_json())

    # --- queue -----------------------------------------------------------------------

    async def queue(self, request: Request) -> Response:
        inputs.check_query(request, set())
        depth = await run_query(self.node, instances.queue_depth())
        total = depth.pop("total")
        return json_response({"due": total, "by_priority": depth})


def _parse_item(index: int, item: Any) -> instances.NewInstance:
    """Validate one batch entry; the error names its place in the list."""
    inputs.reject_nulls(item, f"instances[{index}].")
    try:
        return parse_new_instance(item)
    except DefinitionError as error:
        raise DefinitionError(f"instances[{index}].{error.field}", error.message) from None


def _state(raw: str | None) -> State | None:
    if raw is None or raw == "":
        return None
    try:
        return State(raw)
    except ValueError:
        allowed = ", ".join(state.value for state in State)
        raise ApiError(400, f"state: must be one of {allowed}") from None


def routes(node: NodeView) -> list[BaseRoute]:
    """The workflow routes, for the node's app factory."""
    endpoints = Workflows(node)
    return [
        by_method("/sequences", POST=endpoints.create_sequence, GET=endpoints.list_sequences),
        Route("/sequences/{name}", endpoints.get_sequence, methods=["GET"]),
        by_method("/instances", POST=endpoints.create_instance, GET=endpoints.list_instances),
        Route("/instances/batch", endpoints.create_batch, methods=["POST"]),
        # Ids are UUIDs in the path itself: "/instances/nonsense" is a 404, and "batch" or
        # "dlq" can never be taken for an id.
        Route("/instances/dlq", endpoints.list_dead_letter, methods=["GET"]),
        Route("/instances/{id:uuid}", endpoints.get_instance, methods=["GET"]),
        Route("/instances/{id:uuid}/cancel", endpoints.cancel_instance, methods=["POST"]),
        Route("/instances/{id:uuid}/retry", endpoints.retry_instance, methods=["POST"]),
        Route("/queue", endpoints.queue, methods=["GET"]),
    ]
