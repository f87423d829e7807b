"""A module's HTTP routes as data: what registers them also documents them (``docs/reference/http-api.md``).

Each route module keeps one ``ROUTES`` tuple of :class:`Route`;
:func:`add_routes` puts them on an application and
``admin_tools.reference`` makes the HTTP reference from the same tuples
and the handlers' docstrings, so the page cannot list a route the service
does not serve, nor miss one.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from aiohttp import web


class Route(NamedTuple):
    """One endpoint: its method, its path pattern (aiohttp's ``{name}`` parts) and its handler.

    The handler's docstring's first paragraph says what it answers
    (:func:`summary`): the reference page shows it beside the route.
    """

    method: str
    path: str
    handler: Callable


def add_routes(app: web.Application, routes: tuple[Route, ...]) -> None:
    """Register ``routes`` on ``app`` (a GET also answers HEAD, as aiohttp's ``add_get`` does)."""
    for route in routes:
        if route.method == "GET":
            app.router.add_get(route.path, route.handler)
        else:
            app.router.add_route(route.method, route.path, route.handler)


def summary(route: Route) -> str:
    """The first paragraph of the route's handler's docstring, on one line ("" without one).

    A docstring that opens by restating the route (``GET /path[?query]
    ``{body}``: what it does``) keeps what the route does not say (the
    query, the body) and drops the method and path.
    """
    text = " ".join((route.handler.__doc__ or "").strip().split("\n\n")[0].split())
    if not text.startswith(route.method + " "):
        return text
    literal = False
    for at, char in enumerate(text):  # the first ": " outside ``literals`` ends the restatement
        literal = not literal if char == "`" else literal
        if not literal and text.startswith(": ", at):
            said, rest = text[len(route.method) + 1:at], text[at + 2:]
            path, _, extra = said.partition(" ")
            query = path[min((path.find(c) for c in "[?" if c in path), default=len(path)):]
            extra = " ".join(part for part in (f"``{query}``" if query else "", extra) if part)
            return f"{extra}: {rest}" if extra else rest
    return text
