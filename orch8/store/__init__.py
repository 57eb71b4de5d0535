"""All SQL lives here, grouped by table, next to the one function that runs it.

Functions used by both the synchronous client and the asynchronous API return a `Query`
(statement, parameters, how to read the result) instead of running it, so each statement
is written once and run by `query.run(conn)` or `await query.run_async(conn)`. The worker's
own statements (claim, fenced writes) are async only and run directly.
"""

import orjson
import psycopg.types.json

from orch8.store.query import Query

# jsonb columns (inputs, outputs, steps) are read on every claim: orjson is several times
# faster than the standard library at both directions.
psycopg.types.json.set_json_loads(orjson.loads)
psycopg.types.json.set_json_dumps(orjson.dumps)

__all__ = ["Query"]
