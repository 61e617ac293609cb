"""ASGI middleware, outermost first.

`RequestGuard`: a request id on every response (the caller's when it is printable ASCII), a cap on
body size, HTTP metrics, and the last word on a crash: a 500 in OpenAI's error shape with the
request id and `Connection: close`, instead of a dropped connection.

`Admission`: what every request passes before a route sees it, in this order: the key its path
needs (service/auth.py), then text that cannot be stored (schemas.openai.text_problem) in any
path or query parameter, stored header, or field or key of a JSON body, refused as a 400 naming
it. One place for all of it, so no route, model or query has to remember."""
import json
import logging
import re
import time
import uuid
from urllib.parse import parse_qsl

from starlette.routing import compile_path

from schemas.errors import DomainError
from schemas.openai import text_problem
from service.auth import required_role
from service.errors import ApiError, domain_error, server_error
from service.metrics import LATENCY, REQUESTS

log = logging.getLogger(__name__)

_PRINTABLE_ID = re.compile(rb"[\x21-\x7e]{1,128}")
STORED_HEADERS = ("idempotency-key",)  # headers whose value reaches the database


def request_id(headers: dict[bytes, bytes]) -> str:
    given = headers.get(b"x-request-id", b"")
    return given.decode() if _PRINTABLE_ID.fullmatch(given) else f"req_{uuid.uuid4().hex}"


async def send_error(send, error: ApiError, *, close: bool = False) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    def __init__(self, app, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rid = request_id(headers)
        route, status, started = scope["path"], [500], time.perf_counter()
        scope.setdefault("state", {})["request_id"] = rid
        overflow = False  # set when a body outgrows the cap while it streams in
        response_started = False

        async def send_with_id(message):
            nonlocal response_started
            if overflow:
                return  # the app's reply to a cut-off body is replaced by our 413 below
            if message["type"] == "http.response.start":
                response_started = True
                status[0] = message["status"]
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", rid.encode())]
            await send(message)

        too_big = lambda: ApiError(413, f"Request body is larger than {self.max_body_bytes} bytes.",
                                   code="body_too_large")
        declared = headers.get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await send_error(send_with_id, too_big())

        seen = 0

        async def counted_receive():  # chunked bodies carry no length: count as they arrive
            nonlocal seen, overflow
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    overflow = True
                    return {"type": "http.disconnect"}  # the app stops reading here
            return message

        try:
            await self.app(scope, counted_receive, send_with_id)
            if overflow:
                overflow = False
                await send_error(send_with_id, too_big())
        except Exception:
            log.exception("unhandled error on %s %s (request %s)", scope.get("method"), scope["path"], rid)
            if response_started:
                raise  # a response under way cannot become a 500: the server drops the connection
            overflow = False
            await send_error(send_with_id, server_error(), close=True)
        finally:
            if not route.startswith("/metrics"):
                REQUESTS.labels(route=_route_label(scope), status=str(status[0])).inc()
                LATENCY.labels(route=_route_label(scope)).observe(time.perf_counter() - started)


class Admission:
    """`direct`: (method, path) -> a handler that may answer an admitted request itself, given its
    body (a hot route's fast path); it returns False to leave the request to the app."""

    def __init__(self, app, settings, direct: dict | None = None):
        self.app, self.settings, self.direct = app, settings, direct or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        json_body, path_params = match_route(scope)
        try:
            need = required_role(scope["path"], self.settings)
            if need is not None:
                state["api_key"] = await scope["app"].state.keys.authenticate(headers.get("authorization"), need)
            check_params(scope, path_params, headers)
            body = None
            if json_body and not _json_content(headers.get("content-type")):
                read_as_json(scope)
            if json_body:
                body, receive = await _buffer(receive)
                if body is not None:
                    check_json_body(body)
        except ApiError as e:
            return await send_error(send, e)
        except DomainError as e:  # the database, unreachable while authenticating
            return await send_error(send, domain_error(e))
        direct = self.direct.get((scope["method"], scope["path"]))
        if direct is not None and body is not None and await direct(scope, body, send):
            return
        await self.app(scope, receive, send)


def operations(app) -> list[tuple[re.Pattern, dict, set[str]]]:
    """(path regex, its convertors, methods whose body is JSON) for every documented route, read
    once from the app's OpenAPI document: the public description of its routes."""
    table = getattr(app.state, "admission_table", None)
    if table is None:
        table = []
        for template, ops in app.openapi().get("paths", {}).items():
            regex, _, convertors = compile_path(template)
            json_bodies = {m.upper() for m, op in ops.items()
                           if "application/json" in op.get("requestBody", {}).get("content", {})}
            table.append((regex, convertors, json_bodies))
        app.state.admission_table = table
    return table


def match_route(scope) -> tuple[bool, dict]:
    """(whether this request's body is read as JSON, its path parameters by name), as the
    router will find them; (False, {}) for a path no route has."""
    for regex, convertors, json_bodies in operations(scope["app"]):
        m = regex.match(scope["path"])
        if m:
            return scope["method"] in json_bodies, {k: convertors[k].convert(v) for k, v in m.groupdict().items()}
    return False, {}


def _refuse(param: str | None, problem: str) -> ApiError:
    return ApiError(400, f"Invalid value for '{param}': {problem}." if param else f"Invalid request: {problem}.",
                    param=param, code="invalid_value")


def check_params(scope, path_params: dict, headers: dict[str, str]) -> None:
    if not path_params and (problem := text_problem(scope["path"])):
        raise _refuse(None, f"the path {problem}")
    for name, value in path_params.items():
        if isinstance(value, str) and (problem := text_problem(value)):
            raise _refuse(name, problem)
    query = scope.get("query_string", b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        for text in (name, value):
            if problem := text_problem(text):
                raise _refuse(name if text is value else None, problem)
    for name in STORED_HEADERS:
        if name in headers and (problem := text_problem(headers[name])):
            raise _refuse(name.title(), problem)


def _json_content(content_type: str | None) -> bool:
    """Bodies FastAPI reads as JSON: application/json or application/*+json."""
    if not content_type:
        return False
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def read_as_json(scope) -> None:
    """A route that takes JSON reads the body as JSON whatever its content type says (curl's -d
    sends form encoding; OpenAI reads JSON anyway)."""
    scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
    scope["headers"].append((b"content-type", b"application/json"))


class TrailingSlash:
    """`/v1/models/` is `/v1/models`: the API's paths answer with or without a trailing slash
    (a 307 redirect loses a POST's body or key with some clients)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith("/v1/") and path.endswith("/"):
            scope = dict(scope, path=path.rstrip("/"), raw_path=path.rstrip("/").encode())
        return await self.app(scope, receive, send)


async def _buffer(receive):
    """Read the whole body (the guard outside has capped its size) and a `receive` that replays
    it; (None, receive) when the client left or the cap cut it off."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            replayed = [message]
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            replayed = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
            break

    async def replay():
        return replayed.pop() if replayed else await receive()

    body = b"".join(chunks) if replayed and replayed[0]["type"] == "http.request" else None
    return body, replay


def check_json_body(body: bytes) -> None:
    """Every key and string of a JSON body, by its path (`messages[0].content`). A body that is
    not JSON is left to the route, which says so in its own words."""
    if not body.strip():
        return
    try:
        doc = json.loads(body)
    except RecursionError:
        raise ApiError(400, "The JSON body is nested too deeply.", code="invalid_json") from None
    except ValueError:
        return
    stack = [(doc, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if problem := text_problem(value):
                raise _refuse(path or None, problem)
        elif isinstance(value, dict):
            for k, v in reversed(value.items()):  # reversed: the first problem in the body is named
                if problem := text_problem(k):
                    raise _refuse(path or None, f"a key {problem}")
                stack.append((v, f"{path}.{k}" if path else k))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(value))))


def _route_label(scope) -> str:
    """The route template, not the raw path, so ids do not explode the label set."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
