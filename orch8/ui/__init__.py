"""The operator dashboard: the cluster at a glance, served by every node at `/ui`.

Server-rendered HTML (Jinja2, autoescaped) refreshed by a few lines of plain JavaScript
served from this package: no CDN, no build step, no inline script (the page is sent with
a strict Content-Security-Policy). It reads and acts through the same store queries as
the JSON API. `routes` wires it into the node's app; `session` owns the login cookie and
the CSRF token; `throughput` keeps the completed/failed history the chart draws.
"""
