"""The HTTP edge: a body limit for every route and well-formed JSON, before anything parses.

FastAPI reads a pydantic body completely, and parses it, before any dependency runs (the
bearer token's included), and uvicorn has no body cap: without this guard anyone could send
gigabytes to ``/v1/checkin``. :class:`BodyGuard` is a plain ASGI middleware in front of the
router. For each request it looks up the rule of the route it will reach (:func:`route_rules`,
derived once from the app's routes, so a new route cannot be forgotten):

- JSON routes (an endpoint with a pydantic body): at most ``max_json_body_bytes``, sent as
  ``application/json`` (415 otherwise). The guard reads the body itself, stopping at the
  limit, and lets it through only when it is strict UTF-8 JSON (400 otherwise) with finite
  numbers, 64-bit integers, no lone surrogates and at most :data:`MAX_JSON_DEPTH` levels
  (422 otherwise); FastAPI then parses a document that cannot fail it (Python's parser takes
  ``NaN``/``Infinity``/``1e400``, and echoing them back could not be rendered: a 500).
- Binary routes (the update upload, the admin bundle upload: named explicitly with their own
  limits): they must declare their ``Content-Length`` (411 otherwise: both clients always do,
  and a route can then refuse a wrong size before reading), and are streamed to the route,
  which reads them with ``read_body``/``spool_body``; the guard counts the bytes and raises
  :class:`BodyTooLarge` past the limit, whatever the route does.
- Every other route (and an unknown path or method) takes no body.

A declared ``Content-Length`` over the limit is refused (413) without reading a byte; a
streamed body is refused as soon as it passes the limit. A response that starts before the
request body was read to its end says ``Connection: close``: uvicorn would otherwise keep
reading (and discarding) whatever the client still sends.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import anyio.to_thread
import numpy as np
from fastapi.routing import iter_route_contexts
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.api.deps import BodyTooLarge

__all__ = [
    "MAX_JSON_DEPTH",
    "NO_BODY",
    "BodyGuard",
    "BodyKind",
    "BodyRule",
    "RouteRules",
    "json_problem",
    "route_rules",
]

MAX_JSON_DEPTH = 32  # nesting levels of a JSON body; the deepest message (a task config) has 4
_CHECK_ON_LOOP = 64 * 1024  # bytes of JSON checked on the event loop itself (larger: a thread)


class BodyKind(StrEnum):
    NONE = "none"
    JSON = "json"
    BINARY = "binary"


@dataclass(frozen=True)
class BodyRule:
    kind: BodyKind
    limit: int  # bytes


NO_BODY = BodyRule(BodyKind.NONE, 0)


@dataclass(frozen=True)
class RouteRules:
    """The body rule of each (method, path template), in the router's order."""

    routes: tuple[tuple[re.Pattern[str], frozenset[str], BodyRule], ...]

    def rule(self, method: str, path: str) -> BodyRule:
        """The rule of the route the router will dispatch to (its first match of path and
        method), or no body at all when none matches (404, 405)."""
        for regex, methods, rule in self.routes:
            if method in methods and regex.match(path):
                return rule
        return NO_BODY


def route_rules(
    routes: Sequence[BaseRoute], *, json_limit: int, binary: Mapping[tuple[str, str], int]
) -> RouteRules:
    """The rules of an app's routes. ``binary`` names the (method, path template) of the routes
    that stream a raw body, with their limits; every route with a pydantic body gets the JSON
    limit; all others take no body. A ``binary`` entry that names no route is an error (a
    renamed route would otherwise lose its limit silently)."""
    table: list[tuple[re.Pattern[str], frozenset[str], BodyRule]] = []
    found: set[tuple[str, str]] = set()
    for rc in iter_route_contexts(routes):
        path, methods, regex = rc.path, rc.methods, getattr(rc, "path_regex", None)
        if path is None or not methods or regex is None:
            continue  # not an endpoint (a mount): no rule, so no body
        for method in sorted(methods):
            if (method, path) in binary:
                found.add((method, path))
                rule = BodyRule(BodyKind.BINARY, binary[method, path])
            elif getattr(rc, "body_field", None) is not None:
                rule = BodyRule(BodyKind.JSON, json_limit)
            else:
                rule = NO_BODY
            table.append((regex, frozenset({method}), rule))
    if missing := set(binary) - found:
        raise ValueError(f"binary routes not found among the app's routes: {sorted(missing)}")
    return RouteRules(tuple(table))


# ---------------------------------------------------------------------------------------
# JSON well-formedness
# ---------------------------------------------------------------------------------------

_INT64 = 1 << 63
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string: run only on valid JSON
# numbers that may not fit: 19 digits or more before any fraction, or a 3-digit exponent
# (the lookbehind anchors a match at the start of a number; linear time on any input)
_RISKY_NUMBER = re.compile(
    rb"(?<![\d.eE+-])-?(?:\d{19,}(?:\.\d+)?(?:[eE][+-]?\d+)?|\d+(?:\.\d+)?[eE][+-]?\d{3,})"
)
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789E", b"000000000e")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_DEPTH_STEP = np.zeros(256, np.int8)
_DEPTH_STEP[[ord("["), ord("{")]] = 1
_DEPTH_STEP[[ord("]"), ord("}")]] = -1
_TOO_DEEP = f"JSON nested more than {MAX_JSON_DEPTH} levels deep"


class _Refused(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _Refused("NaN and Infinity are not JSON numbers")


def _number_problem(bare: bytes) -> str | None:
    """A number of the document (strings removed) that does not fit: an integer outside 64
    bits, or a float that overflows (Python reads ``1e400`` as infinity). A scan in C finds
    the documents with no candidate at all (every legitimate one, about a millisecond per MiB);
    only the others are searched number by number."""
    flat = bare.translate(_DIGITS_AS_ZERO)
    if b"0" * 19 not in flat and not any(e in flat for e in (b"e000", b"e+000", b"e-000")):
        return None
    for match in _RISKY_NUMBER.finditer(bare):
        token = match.group()
        if any(c in token for c in b".eE"):
            if not math.isfinite(float(token)):
                return "a number is out of range"
        elif len(token) > 20 or not -_INT64 <= int(token) < _INT64:
            return "an integer does not fit in 64 bits"
    return None


def _too_deep(bare: bytes) -> bool:
    """More than MAX_JSON_DEPTH nested arrays/objects in the document (strings removed): the
    running sum of its brackets, vectorised (a MiB in a few milliseconds)."""
    if bare.count(b"[") + bare.count(b"{") <= MAX_JSON_DEPTH:
        return False
    depth = np.cumsum(_DEPTH_STEP[np.frombuffer(bare, np.uint8)], dtype=np.int32)
    return int(depth.max()) > MAX_JSON_DEPTH


def json_problem(body: bytes) -> tuple[int, str] | None:
    """Why ``body`` is not acceptable JSON, as (status, reason), or None. The reason never
    quotes the body.

    Python's parser (in C, linear) checks the syntax first; its hooks are kept to the rare
    constants, so a megabyte of numbers costs what the parse costs. The rest is checked with
    linear scans of the document with its strings removed (safe once the syntax is valid)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return 400, "body is not UTF-8"
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        return 422, f"body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
    except _Refused as e:
        return 422, f"body is not valid JSON: {e}"
    except RecursionError:
        return 422, _TOO_DEEP
    except ValueError:  # an integer past Python's 4,300-digit conversion limit
        return 422, "body is not valid JSON: an integer does not fit in 64 bits"
    bare = _STRING.sub(b"", body)
    if _too_deep(bare):
        return 422, _TOO_DEEP
    if problem := _number_problem(bare):
        return 422, f"body is not valid JSON: {problem}"
    if _SURROGATE_ESCAPE.search(body):  # rare: then check that every escape pairs up
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return 422, "body is not valid JSON: a string holds a lone surrogate"
    return None


def _is_json(content_type: bytes) -> bool:
    """application/json or application/*+json (FastAPI's own test), parameters ignored."""
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


# ---------------------------------------------------------------------------------------
# The middleware
# ---------------------------------------------------------------------------------------


class _BadRequest(Exception):
    pass


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        return path[len(root) :] or "/"
    return path


def _framing(scope: Scope) -> tuple[int | None, bool, bytes | None]:
    """(declared Content-Length, a body may follow, Content-Type) of the request."""
    lengths: list[bytes] = []
    coded = False
    content_type: bytes | None = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            lengths.append(value.strip())
        elif name == b"transfer-encoding":
            coded = True
        elif name == b"content-type":
            content_type = value
    if not lengths:
        return None, coded, content_type
    if len(lengths) > 1 or not lengths[0].isdigit() or len(lengths[0]) > 20:
        raise _BadRequest("invalid Content-Length")
    declared = int(lengths[0])
    return declared, declared > 0 or coded, content_type


async def _answer(send: Send, status: int, reason: str, *, close: bool) -> None:
    body = json.dumps({"detail": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _too_large(rule: BodyRule, size: int | None = None) -> str:
    if rule.limit == 0:
        return "this route takes no request body"
    if size is not None:
        return f"request body of {size} bytes exceeds this route's limit of {rule.limit}"
    return f"request body exceeds this route's limit of {rule.limit} bytes"


class _Counted:
    """The request's ``receive``, counting body bytes: BodyTooLarge past the limit."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.size = 0
        self.done = False  # the body was read to its end (or the client left)

    async def __call__(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
            if self.size > self.limit:
                raise BodyTooLarge(f"request body exceeds this route's limit of {self.limit} bytes")
        else:
            self.done = True
        return message


class BodyGuard:
    """The body rule of each request's route, enforced before the app sees the request."""

    def __init__(self, app: ASGIApp, rules: RouteRules) -> None:
        self.app = app
        self.rules = rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rule = self.rules.rule(scope["method"], _route_path(scope))
        try:
            declared, has_body, content_type = _framing(scope)
        except _BadRequest as e:
            await _answer(send, 400, str(e), close=True)
            return
        if declared is not None and declared > rule.limit:
            await _answer(send, 413, _too_large(rule, declared), close=True)
            return
        if rule.kind is BodyKind.BINARY:
            if declared is None and has_body:
                await _answer(send, 411, "Content-Length required", close=True)
                return
            await self._stream(scope, receive, send, rule)
            return
        if rule.kind is BodyKind.JSON and has_body and content_type and not _is_json(content_type):
            await _answer(send, 415, "Content-Type must be application/json", close=True)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body ended: nobody to answer
            body += message.get("body", b"")
            if len(body) > rule.limit:
                await _answer(send, 413, _too_large(rule), close=message.get("more_body", False))
                return
            if not message.get("more_body", False):
                break
        if body and rule.kind is BodyKind.JSON:
            if not content_type:
                await _answer(send, 415, "Content-Type must be application/json", close=False)
                return
            data = bytes(body)
            # a large document costs tens of milliseconds to check: off the event loop
            if len(data) <= _CHECK_ON_LOOP:
                problem = json_problem(data)
            else:
                problem = await anyio.to_thread.run_sync(json_problem, data)
            if problem:
                await _answer(send, *problem, close=False)
                return
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _stream(self, scope: Scope, receive: Receive, send: Send, rule: BodyRule) -> None:
        counted = _Counted(receive, rule.limit)

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not counted.done:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, counted, closing_send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands out the body already read, then the client's own events."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
