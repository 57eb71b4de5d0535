"""All SQL lives here, grouped by table, next to the one function that runs it.

Functions used by both the synchronous client and the asynchronous API return a `Query`
(statement, parameters, how to read the result) instead of running it, so each statement
is written once and run by `query.run(conn)` or `await query.run_async(conn)`. The worker's
own statements (claim, fenced writes) are async only and run directly.
"""

from orch8.store.query import Query

__all__ = ["Query"]
