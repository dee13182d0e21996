"""The admin page's HTTP routes under /ui: pages and their JSON view (GET), actions (POST only,
from a page of this origin, with the session's form token), login and logout, static files.

Who may see it: with auth off, anyone who reaches the HTTP port (as /stats); with auth on, an
identity with admin = true, by the session its token opened at /ui/login or by an
"Authorization: Bearer" header (scripts; reading only, actions need the session's form token).
Every answer carries a Content-Security-Policy without inline scripts or styles, and may not be
framed. A request whose Host header names none of the page's own names is refused (421) before
anything else: DNS rebinding (sessions.host_allowed).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import trio
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ..api.http import admin_of, peer_of, refused
from ..backends.retry import describe
from ..errors import CallError, InvalidArgument, NotFound, PermissionDenied
from ..security.access import NOBODY, Identity, target_of
from . import actions, pages, views
from .markup import Html, link
from .sessions import (
    COOKIE,
    Session,
    Sessions,
    allowed_hosts,
    cookie,
    csrf_valid,
    host_allowed,
    same_origin,
)

logger = logging.getLogger(__name__)

MAX_FORM_BYTES = 64 * 1024
MAX_FORM_FIELDS = 2000
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
STATUS = {InvalidArgument: 400, PermissionDenied: 403, NotFound: 404}
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
MAX_OFFSET = 1_000_000  # a listing's offset beyond this reads as this

Handler = Callable[[Request], Awaitable[Response]]
Form = dict[str, list[str]]


@dataclass(frozen=True)
class Viewer:
    """Who asks: the identity, and the session the browser holds (None: a bearer token)."""

    identity: Identity
    session: Session | None  # with auth off: None until a page with forms is served
    fresh: bool = False  # the session was opened by this request: its cookie goes with it


class Refusal(Exception):
    """A request refused before any work: the answer to send."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def routes(parts: views.Parts) -> list[BaseRoute]:
    """The /ui routes of the HTTP port."""
    return Console(parts).routes()


class Console:
    """The admin page's handlers over the daemon's parts."""

    def __init__(self, parts: views.Parts, sessions: Sessions | None = None) -> None:
        self.parts = parts
        self.sessions = sessions or Sessions()
        self.overview_cache = views.Overview(parts)
        self.hosts = allowed_hosts(parts.hosts)

    def routes(self) -> list[BaseRoute]:
        get, post = ["GET", "HEAD"], ["POST"]
        return [
            Route("/ui", self._page(self.overview), methods=get),
            Route("/ui/", self._page(self.to_overview), methods=get),
            Route("/ui/api/overview", self._page(self.overview_json), methods=get),
            Route("/ui/queue", self._page(self.queue), methods=get),
            Route("/ui/topic", self._page(self.topic), methods=get),
            Route("/ui/login", self._page(self.login_form), methods=get),
            Route("/ui/login", self._page(self.login), methods=post),
            Route("/ui/logout", self._page(self.logout), methods=post),
            Route("/ui/dead-letters", self._page(self.dead_letters), methods=post),
            Route("/ui/delayed/cancel", self._page(self.cancel_delayed), methods=post),
            Route("/ui/queue/purge", self._page(self.purge), methods=post),
            Route("/ui/static/{name}", self._page(static), methods=get),
        ]

    # ---- the frame around every handler -------------------------------------------------

    def _page(self, handler: Handler) -> Handler:
        """handler with the security headers on its answer, and its errors as pages."""

        async def guarded(request: Request) -> Response:
            try:
                self._check_host(request)
                response = await handler(request)
            except Refusal as refusal:
                response = refusal.response
            except CallError as error:
                response = self._problem(request, STATUS.get(type(error), 503), error.message)
            except (OSError, trio.TooSlowError) as error:
                response = self._problem(request, 503, f"unavailable: {describe(error)}")
            except Exception:
                logger.exception("HTTP %s %s failed", request.method, request.url.path)
                response = self._problem(request, 500, "internal error (logged)")
            for name, value in HEADERS.items():
                response.headers.setdefault(name, value)
            response.headers.setdefault("Cache-Control", "no-store")
            return response

        return guarded

    def _check_host(self, request: Request) -> None:
        """Refusal (421, plain text) unless the request names one of the page's host names."""
        server = request.scope.get("server")
        local = server[0] if server else None
        if host_allowed(request.headers, self.hosts, local):
            return
        reason = "a request for a host name the page does not answer to ([http] ui_hosts)"
        refused(request, self.parts.metrics, "a caller", "MISDIRECTED", reason)
        text = (
            "421 misdirected request: the admin page answers only to the names in [http] "
            "ui_hosts, server.http_host, localhost, 127.0.0.1, [::1] and this machine's host "
            "name\n"
        )
        raise Refusal(Response(text, 421, media_type="text/plain; charset=utf-8"))

    def _problem(self, request: Request, status: int, text: str) -> Response:
        if request.url.path.startswith("/ui/api/"):
            return JSONResponse({"error": text}, status)
        frame = pages.Frame(self.parts.node, "", logged_in=False)
        return HTMLResponse(pages.problem(frame, status, text), status)

    def viewer(self, request: Request) -> Viewer:
        """Who asks, or Refusal: to the login form for a page, 401/403 for the JSON view."""
        access = self.parts.access()
        session = self.sessions.get(request.cookies.get(COOKIE))
        if access is None or not access.enabled:
            return Viewer(NOBODY, session)
        metrics = self.parts.metrics
        if session is not None and session.token is not None:
            found = admin_of(request, f"Bearer {session.token}", access, metrics)
            if isinstance(found, Identity):
                return Viewer(found, session, fresh=False)
            self.sessions.close(session.id)  # removed, no longer admin, or its token changed
        authorization = request.headers.get("authorization")
        if authorization is None and not request.url.path.startswith("/ui/api/"):
            raise Refusal(RedirectResponse("/ui/login", 303))
        found = admin_of(request, authorization, access, metrics)
        if isinstance(found, Response):
            raise Refusal(found)
        return Viewer(found, None, fresh=False)

    def with_forms(self, viewer: Viewer) -> Viewer:
        """viewer with a session to carry the form token of a page with forms: with auth off,
        one is opened here (only here, so polls and error pages open none)."""
        if viewer.session is not None or self._auth_on():
            return viewer
        return Viewer(viewer.identity, self.sessions.open(None), fresh=True)

    def _frame(self, viewer: Viewer) -> pages.Frame:
        session = viewer.session
        csrf = session.csrf if session else ""
        return pages.Frame(self.parts.node, csrf, logged_in=bool(session and session.token))

    def _html(self, request: Request, viewer: Viewer, body: Html, status: int = 200) -> Response:
        response = HTMLResponse(body, status)
        if viewer.fresh and viewer.session is not None:
            secure = request.url.scheme == "https"
            response.headers.append("Set-Cookie", cookie(viewer.session, secure=secure))
        return response

    async def _posted(self, request: Request) -> tuple[Viewer, Form]:
        """An action's viewer and form, or Refusal: a form from another origin or without its
        session's token is refused (403), before any work."""
        viewer = self.viewer(request)
        if not same_origin(request.headers, request.url.scheme):
            self._refuse_form(request, viewer, "a form from another origin")
        form = await read_form(request)
        if not csrf_valid(viewer.session, first(form, "csrf")):
            self._refuse_form(request, viewer, "a form without this session's token")
        return viewer, form

    def _refuse_form(self, request: Request, viewer: Viewer, what: str) -> None:
        who = f"identity {viewer.identity.name}" if viewer.identity.name else "a caller"
        refused(request, self.parts.metrics, who, "PERMISSION_DENIED", what)
        text = f"refused {what}: reload the page and try again"
        raise Refusal(self._problem(request, 403, text))

    def _record(self, request: Request, viewer: Viewer, method: str, target: str) -> None:
        actions.record(
            self.parts.metrics, f"ui/{method}", viewer.identity, peer_of(request), target
        )

    # ---- pages ------------------------------------------------------------------------

    async def to_overview(self, _: Request) -> Response:
        return RedirectResponse("/ui", 308)

    async def overview(self, request: Request) -> Response:
        viewer = self.viewer(request)
        sort = request.query_params.get("sort", "name")
        sort = sort if sort in pages.SORTABLE else "name"
        order = "desc" if request.query_params.get("order") == "desc" else "asc"
        data = await self.overview_cache.get()
        return self._html(request, viewer, pages.overview(self._frame(viewer), data, sort, order))

    async def overview_json(self, request: Request) -> Response:
        self.viewer(request)
        return JSONResponse(await self.overview_cache.get())

    async def queue(self, request: Request) -> Response:
        viewer = self.viewer(request)
        query = request.query_params
        name = query.get("name", "")
        view = await views.queue_view(
            self.parts, name, offset(query.get("dead")), offset(query.get("delayed"))
        )
        viewer = self.with_forms(viewer)
        message = pages.notice(query.get("done"), query.get("n"), query.get("kept"))
        return self._html(request, viewer, pages.queue(self._frame(viewer), view, message))

    async def topic(self, request: Request) -> Response:
        viewer = self.viewer(request)
        query = request.query_params
        view = await views.topic_view(
            self.parts, query.get("name", ""), offset(query.get("delayed"))
        )
        viewer = self.with_forms(viewer)
        message = pages.notice(query.get("done"), query.get("n"), None)
        return self._html(request, viewer, pages.topic(self._frame(viewer), view, message))

    # ---- login --------------------------------------------------------------------------

    async def login_form(self, _: Request) -> Response:
        if not self._auth_on():
            return RedirectResponse("/ui", 303)
        return HTMLResponse(pages.login(self.parts.node))

    async def login(self, request: Request) -> Response:
        """Open a session for an admin's token; the token is sent this once."""
        if not same_origin(request.headers, request.url.scheme):
            self._refuse_form(request, Viewer(NOBODY, None), "a login from another origin")
        if not self._auth_on():
            return RedirectResponse("/ui", 303)
        token = first(await read_form(request), "token").strip()
        found = admin_of(request, f"Bearer {token}", self.parts.access(), self.parts.metrics)
        if isinstance(found, Response):
            problem = "Unknown token." if found.status_code == 401 else "Not an admin identity."
            return HTMLResponse(pages.login(self.parts.node, problem), found.status_code)
        session = self.sessions.open(token)
        actions.audit.info(
            "admin: identity %s from %s: logged in to the admin page",
            found.name,
            peer_of(request),
        )
        response = RedirectResponse("/ui", 303)
        secure = request.url.scheme == "https"
        response.headers.append("Set-Cookie", cookie(session, secure=secure))
        return response

    async def logout(self, request: Request) -> Response:
        viewer, _ = await self._posted(request)
        if viewer.session is not None:
            self.sessions.close(viewer.session.id)
        response = RedirectResponse("/ui/login" if self._auth_on() else "/ui", 303)
        response.headers.append("Set-Cookie", cookie(None, secure=request.url.scheme == "https"))
        return response

    def _auth_on(self) -> bool:
        access = self.parts.access()
        return access is not None and access.enabled

    # ---- actions ------------------------------------------------------------------------

    async def dead_letters(self, request: Request) -> Response:
        """Requeue or delete dead letters of one queue: one, those selected, or (requeue) all."""
        viewer, form = await self._posted(request)
        queue = first(form, "queue")
        verb = "requeue" if "requeue" in form else "delete"
        ids = chosen(form, verb, allow_all=verb == "requeue")
        if verb == "requeue":
            self._record(request, viewer, "RequeueDeadLetters", target_of(queue, ids))
            moved, kept = await actions.requeue(self.parts, queue, ids)
            done = {"done": "requeued", "n": moved, "kept": kept}
        else:
            self._record(request, viewer, "DeleteDeadLetters", target_of(queue, ids))
            done = {"done": "deleted", "n": await actions.delete(self.parts, queue, ids)}
        return back_to("queue", queue, done, "dead-letters")

    async def cancel_delayed(self, request: Request) -> Response:
        viewer, form = await self._posted(request)
        kind = "topic" if first(form, "kind") == "topic" else "queue"
        name = first(form, "name")
        ids = chosen(form, "cancel", allow_all=False)
        self._record(request, viewer, "CancelDelayed", target_of(name, ids))
        cancelled, _ = await actions.cancel(self.parts, ids)
        return back_to(kind, name, {"done": "cancelled", "n": cancelled}, "delayed")

    async def purge(self, request: Request) -> Response:
        """Purge a queue once its name is typed again on the confirmation page."""
        viewer, form = await self._posted(request)
        queue = first(form, "queue")
        if first(form, "confirm") != queue or not queue:
            info = await self.parts.queues.info(queue)
            what = f"Purge {info.ready:,} ready messages of {queue}"
            body = pages.confirm(self._frame(viewer), queue, what, "/ui/queue/purge", Html(""))
            return self._html(request, viewer, body)
        self._record(request, viewer, "PurgeQueue", target_of(queue, ()))
        purged = await actions.purge(self.parts, queue)
        return back_to("queue", queue, {"done": "purged", "n": purged}, "purge")


# ---- helpers ------------------------------------------------------------------------------


async def read_form(request: Request) -> Form:
    """A posted form (application/x-www-form-urlencoded) of at most MAX_FORM_BYTES."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise Refusal(Response("a form (application/x-www-form-urlencoded) is expected\n", 415))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise Refusal(Response("form too large\n", 413))
    try:
        text = body.decode()
        return parse_qs(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except ValueError:  # not UTF-8, or too many fields
        raise Refusal(Response("malformed form\n", 400)) from None


def first(form: Form, name: str) -> str:
    values = form.get(name)
    return values[0] if values else ""


def chosen(form: Form, verb: str, *, allow_all: bool) -> list[str]:
    """The message ids an action names: its button's value (one id), the ticked boxes
    ("selected"), or none at all ("all", where allowed: every message of the queue)."""
    value = first(form, verb)
    if value == "all" and allow_all:
        return []
    ids = form.get("ids", []) if value == "selected" else [value]
    if not ids or not all(ids):
        raise InvalidArgument("select at least one message first")
    return ids


def offset(value: str | None) -> int:
    """A listing's offset from the URL: ASCII digits (not "²", which int() refuses), at most
    MAX_OFFSET; anything else reads as 0."""
    if not value or not (value.isascii() and value.isdigit()):
        return 0
    return min(int(value[:8]), MAX_OFFSET)


def back_to(kind: str, name: str, query: dict[str, object], anchor: str) -> Response:
    """303 to the page of the queue or topic an action was taken on, saying what it did."""
    return RedirectResponse(f"{link(f'/ui/{kind}', name=name, **query)}#{anchor}", 303)


STATIC_DIRECTORY = Path(__file__).parent / "static"


def _load_static() -> dict[str, tuple[bytes, str, str]]:
    """The files of static/ by name, with their type and ETag (none when an install left
    them out: the pages still work, unstyled and without live refresh)."""
    files: dict[str, tuple[bytes, str, str]] = {}
    paths = STATIC_DIRECTORY.iterdir() if STATIC_DIRECTORY.is_dir() else ()
    for path in paths:
        if path.suffix in STATIC_TYPES:
            data = path.read_bytes()
            etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
            files[path.name] = (data, STATIC_TYPES[path.suffix], etag)
    return files


STATIC = _load_static()


async def static(request: Request) -> Response:
    """The page's style sheet and script, from memory; revalidated by ETag."""
    found = STATIC.get(request.path_params["name"])
    if found is None:
        return Response("not found\n", 404)
    data, media_type, etag = found
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type, headers=headers)
