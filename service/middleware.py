"""ASGI middleware: a request id on every response, a cap on body size, HTTP metrics."""
import json
import time
import uuid

from service.errors import ApiError
from service.metrics import LATENCY, REQUESTS


class RequestGuard:
    def __init__(self, app, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode()[:128] or f"req_{uuid.uuid4().hex}"
        route, status, started = scope["path"], [500], time.perf_counter()

        overflow = False  # set when a body outgrows the cap while it streams in

        async def send_with_id(message):
            if overflow:
                return  # the app's reply to a cut-off body is replaced by our 413 below
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]
            await send(message)

        too_big = lambda: ApiError(413, f"Request body is larger than {self.max_body_bytes} bytes.",
                                   code="body_too_large")
        declared = headers.get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._reject(too_big(), send_with_id)

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
                await self._reject(too_big(), send_with_id)
        finally:
            if not route.startswith("/metrics"):
                REQUESTS.labels(route=_route_label(scope), status=str(status[0])).inc()
                LATENCY.labels(route=_route_label(scope)).observe(time.perf_counter() - started)

    @staticmethod
    async def _reject(error: ApiError, send):
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _route_label(scope) -> str:
    """The route template, not the raw path, so ids do not explode the label set."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
