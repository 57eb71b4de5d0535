"""`python -m bench <scenario>`: orch8 measured on a real PostgreSQL, beside a minimal raw
SQL loop and pgqueuer, with settings and machine recorded for every figure.

Modules: `server` (the PostgreSQL server and scratch databases), `engine` (real
`orch8-supervisor` processes, backlogs and completion), `raw` (the minimal SQL loop),
`peer` (pgqueuer), `runs` (interleaved repetitions and their statistics), `report`
(JSON, Markdown, plots, recommendation), `scenarios/` (one module per scenario).
"""
