"""The OpenAPI document for the node's HTTP API, served at `/openapi.json`.

Written by hand as data: the API is small, and a document we read and edit directly is
easier to keep honest than one inferred from code. `tests/test_api_openapi.py` holds the
app to it (every route documented, every response valid against its schema).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orch8.api.errors import CODES, json_response
from orch8.requests import MAX_CONCURRENCY

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {**schema, "nullable": True}


def strict(properties: dict[str, Schema], required: list[str]) -> Schema:
    schema: Schema = {"type": "object", "properties": properties,
                      "additionalProperties": False}
    if required:  # OpenAPI 3.0 wants at least one entry in `required`, or none at all
        schema["required"] = required
    return schema


INTEGER_MS: Schema = {"type": "integer", "minimum": 0, "maximum": 7 * 24 * 3600 * 1000}
NAME: Schema = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"}
PRIORITY: Schema = {"type": "string", "enum": ["low", "normal", "high", "critical"]}
STATE: Schema = {"type": "string",
                 "enum": ["scheduled", "running", "completed", "failed", "cancelled"]}
TIME: Schema = {"type": "string", "format": "date-time"}
# PostgreSQL text cannot hold U+0000, so the API refuses it; say so in the document.
ANY_KEY: Schema = {"type": "string", "minLength": 1, "pattern": "^[^\\u0000]*$"}
KEY: Schema = ANY_KEY | {"maxLength": 256}

SCHEMAS: dict[str, Schema] = {
    "Error": strict({"error": {"type": "string", "enum": sorted(set(CODES.values()))},
                     "detail": {"type": "string"}}, ["error", "detail"]),
    "Retry": strict({
        "max_attempts": {"type": "integer", "minimum": 1, "maximum": 1000},
        "initial_backoff_ms": INTEGER_MS,
        "max_backoff_ms": INTEGER_MS,
        "multiplier": {"type": "number", "minimum": 1, "maximum": 10},
    }, []) | {"description": "max_backoff_ms must not be below initial_backoff_ms"},
    "Step": strict({
        "id": NAME, "handler": NAME, "params": {"type": "object"}, "retry": ref("Retry"),
        "timeout_ms": {**INTEGER_MS, "minimum": 1}, "delay_ms": INTEGER_MS,
    }, ["id", "handler"]),
    "NewSequence": strict({"name": NAME, "steps": {
        "type": "array", "items": ref("Step"), "minItems": 1, "maxItems": 1000}},
        ["name", "steps"]),
    "Sequence": strict({"name": NAME, "version": {"type": "integer", "minimum": 1},
                        "steps": {"type": "array", "items": ref("Step")}, "created_at": TIME},
                       ["name", "version", "steps", "created_at"]),
    "SequenceList": strict({"sequences": {"type": "array", "items": ref("Sequence")}},
                           ["sequences"]),
    "NewInstance": strict({
        "sequence": NAME,
        "input": {"type": "object"},
        "version": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
        "priority": {"oneOf": [PRIORITY, {"type": "integer", "minimum": 0, "maximum": 3}],
                     "description": "A name, or 0 (low) to 3 (critical)"},
        "delay_ms": INTEGER_MS,
        "run_at": TIME,
        "idempotency_key": KEY,
        "concurrency_key": KEY,
        "max_concurrency": {"type": "integer", "minimum": 1, "maximum": MAX_CONCURRENCY},
    }, ["sequence"]) | {
        "description": "Give delay_ms or run_at, not both; concurrency_key and "
                       "max_concurrency go together.",
        "not": {"required": ["delay_ms", "run_at"]},
        "anyOf": [{"required": ["concurrency_key", "max_concurrency"]},
                  {"not": {"anyOf": [{"required": ["concurrency_key"]},
                                     {"required": ["max_concurrency"]}]}}],
    },
    "NewBatch": strict({"instances": {"type": "array", "items": ref("NewInstance"),
                                      "minItems": 1, "maxItems": 1000}}, ["instances"]),
    "Created": strict({"id": {"type": "string", "format": "uuid"},
                       "deduplicated": {"type": "boolean"}}, ["id", "deduplicated"]),
    "CreatedBatch": strict({"instances": {"type": "array", "items": ref("Created")}},
                           ["instances"]),
    "Instance": strict({
        "id": {"type": "string", "format": "uuid"},
        "sequence": NAME, "version": {"type": "integer"}, "state": STATE,
        "priority": PRIORITY, "next_fire_at": TIME, "input": {"type": "object"},
        "step_index": {"type": "integer"}, "attempt": {"type": "integer"},
        "concurrency_key": nullable({"type": "string"}),
        "max_concurrency": nullable({"type": "integer"}),
        "idempotency_key": nullable({"type": "string"}),
        "claimed_by": nullable({"type": "string"}),
        "last_error": nullable({"type": "string"}),
        "created_at": TIME, "updated_at": TIME, "finished_at": nullable(TIME),
        "outputs": {"type": "object", "description": "Step id -> output (single reads)"},
    }, ["id", "sequence", "version", "state", "priority", "next_fire_at", "input",
        "step_index", "attempt", "created_at", "updated_at", "finished_at"]),
    "InstancePage": strict({
        "instances": {"type": "array", "items": ref("Instance")},
        "next": nullable({"type": "string", "format": "uuid",
                          "description": "Pass as `before` for the next page"}),
    }, ["instances", "next"]),
    "NewRateLimit": strict({
        "max": {"type": "integer", "minimum": 1, "maximum": 100_000},
        "window_ms": {"type": "integer", "minimum": 10, "maximum": 86_400_000},
    }, ["max", "window_ms"]),
    "RateLimit": strict({
        "handler": NAME, "max": {"type": "integer"}, "window_ms": {"type": "integer"},
        "calls_in_window": {"type": "integer", "minimum": 0},
        "created_at": TIME, "updated_at": TIME,
    }, ["handler", "max", "window_ms", "calls_in_window", "created_at", "updated_at"]),
    "RateLimitList": strict({"rate_limits": {"type": "array", "items": ref("RateLimit")}},
                            ["rate_limits"]),
    "Queue": strict({
        "due": {"type": "integer", "minimum": 0},
        "by_priority": strict({name: {"type": "integer", "minimum": 0}
                               for name in PRIORITY["enum"]}, list(PRIORITY["enum"])),
    }, ["due", "by_priority"]),
}


def json_content(schema: Schema) -> Schema:
    return {"content": {"application/json": {"schema": schema}}}


def responses(success: dict[int, tuple[str, Schema]], *errors: int) -> Schema:
    """Success responses plus the given error statuses, all with the Error body."""
    documented: Schema = {
        str(status): {"description": text, **json_content(schema)}
        for status, (text, schema) in success.items()
    }
    for status in (401, *errors):
        documented[str(status)] = {"description": CODES[status], **json_content(ref("Error"))}
    return documented


def body(name: str) -> Schema:
    return {"required": True, **json_content(ref(name))}


def query(name: str, schema: Schema, text: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": text}


def path(name: str, schema: Schema) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema}


INSTANCE_ID = path("id", {"type": "string", "format": "uuid"})
PAGE = [query("before", {"type": "string", "format": "uuid"}, "Return instances older "
              "than this id (the previous page's `next`)"),
        query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "Page size")]
BODY_ERRORS = (400, 409, 413, 415, 422)
INSTANCE = {200: ("The instance", ref("Instance"))}
PAGE_OF_INSTANCES = {200: ("Newest first", ref("InstancePage"))}

WORKFLOW_PATHS: dict[str, Schema] = {
    "/sequences": {
        "post": {"summary": "Create a sequence (a new version under an existing name)",
                 "requestBody": body("NewSequence"),
                 "responses": responses({201: ("Stored", ref("Sequence"))}, *BODY_ERRORS)},
        "get": {"summary": "The latest version of every sequence",
                "responses": responses({200: ("Sequences by name", ref("SequenceList"))},
                                       400)},
    },
    "/sequences/{name}": {
        "get": {"summary": "One sequence, latest or a given version",
                "parameters": [path("name", NAME), query(
                    "version", {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
                    "A given version (default the latest)")],
                "responses": responses({200: ("The sequence", ref("Sequence"))},
                                       400, 404, 422)},
    },
    "/instances": {
        "post": {"summary": "Start an instance",
                 "requestBody": body("NewInstance"),
                 "responses": responses({
                     201: ("Created", ref("Created")),
                     200: ("The idempotency key was known: the first instance",
                           ref("Created"))}, 404, *BODY_ERRORS)},
        "get": {"summary": "List instances, newest first",
                "parameters": [query("state", STATE, "Only in this state"),
                               query("sequence", NAME, "Only of this sequence"),
                               query("concurrency_key", ANY_KEY,
                                     "Only with this concurrency key"),
                               *PAGE],
                "responses": responses(PAGE_OF_INSTANCES, 400, 422)},
    },
    "/instances/batch": {
        "post": {"summary": "Start up to 1000 instances in one transaction (all or none)",
                 "requestBody": body("NewBatch"),
                 "responses": responses({201: ("Created, in request order",
                                               ref("CreatedBatch"))}, 404, *BODY_ERRORS)},
    },
    "/instances/dlq": {
        "get": {"summary": "The dead letter: failed instances, newest first",
                "parameters": [query("sequence", NAME, "Only of this sequence"), *PAGE],
                "responses": responses(PAGE_OF_INSTANCES, 400, 422)},
    },
    "/instances/{id}": {
        "get": {"summary": "One instance with its step outputs", "parameters": [INSTANCE_ID],
                "responses": responses(INSTANCE, 404)},
    },
    "/instances/{id}/cancel": {
        "post": {"summary": "Cancel a scheduled or running instance",
                 "parameters": [INSTANCE_ID], "responses": responses(INSTANCE, 404, 409)},
    },
    "/instances/{id}/retry": {
        "post": {"summary": "Send a failed instance back to scheduled",
                 "parameters": [INSTANCE_ID], "responses": responses(INSTANCE, 404, 409)},
    },
    "/queue": {
        "get": {"summary": "Due scheduled instances (the auto-scaling signal)",
                "responses": responses({200: ("Queue depth", ref("Queue"))}, 400)},
    },
    "/metrics": {
        "get": {"summary": "Prometheus metrics of this node",
                "responses": {"200": {"description": "Prometheus text format",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}},
                              "401": {"description": "unauthorized",
                                      **json_content(ref("Error"))}}},
    },
    "/openapi.json": {
        "get": {"summary": "This document",
                "responses": responses({200: ("OpenAPI 3.0", {"type": "object"})})},
    },
}

HEALTH_PATHS: dict[str, Schema] = {
    "/health/live": {"get": {"summary": "Is the process running?", "security": [],
                             "responses": {"200": {"description": "alive"}}}},
    "/health/ready": {"get": {"summary": "Is the node accepting work?", "security": [],
                              "responses": {"200": {"description": "ready"},
                                            "503": {"description": "draining or not ready"}}}},
}

CLUSTER_PATHS: dict[str, Schema] = {
    "/cluster/nodes": {
        "get": {"summary": "Nodes of the cluster",
                "responses": responses({200: ("Nodes", {"type": "array",
                                                         "items": {"type": "object"}})})},
    },
    "/cluster/nodes/{node_id}/drain": {
        "post": {"summary": "Ask a node to drain: stop claiming, finish, leave",
                 "parameters": [path("node_id", {"type": "string",
                                                 "pattern": "^[A-Za-z0-9_.-]{1,64}$"})],
                 "responses": {"200": {"description": "draining"},
                               **responses({}, 400, 404, 409)}},
    },
}

HANDLER = path("handler", NAME)
RATE_LIMIT_PATHS: dict[str, Schema] = {
    "/rate-limits": {
        "get": {"summary": "Every per-handler rate limit",
                "responses": responses({200: ("Limits by handler", ref("RateLimitList"))},
                                       400)},
    },
    "/rate-limits/{handler}": {
        "put": {"summary": "Allow at most `max` calls of a handler in any `window_ms`",
                "parameters": [HANDLER], "requestBody": body("NewRateLimit"),
                "responses": responses({200: ("The limit", ref("RateLimit"))},
                                       *BODY_ERRORS)},
        "delete": {"summary": "Remove a handler's limit", "parameters": [HANDLER],
                   "responses": {"204": {"description": "removed"},
                                 **responses({}, 404, 422)}},
    },
}


def document() -> Schema:
    """The whole OpenAPI document."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "orch8", "version": "1",
                 "description": "A durable workflow engine whose only shared state is "
                                "PostgreSQL. Errors are `{\"error\": code, \"detail\": text}`."},
        "security": [{"bearer": []}],
        "paths": {**HEALTH_PATHS, **CLUSTER_PATHS, **WORKFLOW_PATHS, **RATE_LIMIT_PATHS},
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "ORCH8_API_TOKEN, when set"}},
        },
    }


def route() -> Route:
    """`GET /openapi.json`."""
    rendered = document()

    async def endpoint(request: Request) -> Response:
        return json_response(rendered)

    return Route("/openapi.json", endpoint, methods=["GET"])
