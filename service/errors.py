"""One error shape for every failure a caller sees: OpenAI's {"error": {message, type, param, code}}."""
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.openai import ErrorInfo, ErrorResponse, ParamError
from schemas.errors import Conflict, DomainError, Invalid, NotFound, Unavailable
from service.engine import EngineError, EngineOverloaded

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable"}
# The domain's errors (schemas/errors.py) as HTTP: the one place this mapping lives.
DOMAIN_STATUS = ((Invalid, 400), (NotFound, 404), (Conflict, 409), (Unavailable, 503))


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# Routes declare these so the OpenAPI document shows the error shape.
ERROR_RESPONSES = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 429, 503)}


# Segments pydantic adds to a location for union members and validators, not field names.
_TYPE_SEGMENTS = ("str", "int", "float", "bool", "list", "dict")


def param_path(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    path = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _TYPE_SEGMENTS or str(part).startswith(("function-", "tagged-union", "list[", "dict[")):
            continue
        else:
            path += f".{part}" if path else str(part)
    return path or None


def validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"We could not parse the JSON body of your request: {first.get('msg')}",
                        code="invalid_json")
    param = param_path(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param,
                        code="missing_required_parameter")
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, ParamError):  # a validator that names the parameter it refuses
        param = f"{param}.{cause.param}" if param else cause.param
        return ApiError(400, f"Invalid value for '{param}': {cause}", param=param, code=cause.code)
    if param is None:  # the body as a whole (not an object, say): no parameter to name
        return ApiError(400, f"Invalid request body: {msg}", code="invalid_value")
    return ApiError(400, f"Invalid value for '{param}': {msg}", param=param, code="invalid_value")


def domain_error(exc: DomainError) -> ApiError:
    status = next((s for cls, s in DOMAIN_STATUS if isinstance(exc, cls)), 400)
    headers = {"Retry-After": "1"} if status == 503 else None
    return ApiError(status, str(exc), param=exc.param, code=exc.code, headers=headers)


def engine_error(exc: EngineError) -> ApiError:
    """A generation that did not start (the engine is overloaded: its own message) or could not
    finish (a remote server failed, an engine was shut down: the details stay in the log, not in
    the caller's answer); retryable either way."""
    if isinstance(exc, EngineOverloaded):
        return ApiError(503, str(exc), code="engine_overloaded", headers={"Retry-After": str(exc.retry_after)})
    log.warning("generation failed: %s", exc)
    return ApiError(503, "The model could not finish this answer; please retry.", code="engine_error",
                    headers={"Retry-After": "1"})


def describe(app: FastAPI) -> None:
    """The OpenAPI document says what the app does: no 422 (validation errors are 400s in the
    error shape), and the bearer key on every /v1 route."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for path, operations in schema.get("paths", {}).items():
            for op in operations.values():
                responses = op.setdefault("responses", {})
                if responses.pop("422", None) is not None:
                    responses.setdefault("400", {"description": "Bad Request", "content": error_ref})
                if path.startswith("/v1/"):
                    op["security"] = [{"bearer": []}]
        components = schema.setdefault("components", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(name, None)
        components.setdefault("schemas", {}).setdefault("ErrorResponse", ErrorResponse.model_json_schema(
            ref_template="#/components/schemas/{model}"))
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                    "description": "an API key: fl-…"}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def install(app: FastAPI) -> None:
    describe(app)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(DomainError)
    async def on_domain_error(request: Request, exc: DomainError):
        return domain_error(exc).response()

    @app.exception_handler(EngineError)
    async def on_engine_error(request: Request, exc: EngineError):
        return engine_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), headers=exc.headers).response()  # 405's Allow


def server_error() -> ApiError:
    """What a crash looks like to the caller (service/middleware.py sends it, with the request id)."""
    return ApiError(500, "The server had an error while processing your request.", type="server_error")
