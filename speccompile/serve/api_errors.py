"""OpenAI-style error objects: {"error": {"message", "type", "param", "code"}}, and the handlers that turn every
failure of a request (bad JSON, a wrong type, an unknown model, a prompt over the compiled context, a full queue,
a crash) into one, never a 500 carrying a traceback."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from speccompile.errors import ContextLengthError, SharedPassError, SpeccompileError, mentioned
from speccompile.serve.protocol import ChatRequest, CompletionRequest

log = logging.getLogger("speccompile.serve")
REQUEST_FIELDS = set(ChatRequest.model_fields) | set(CompletionRequest.model_fields)


class APIError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def from_runtime(e: SpeccompileError) -> APIError:
    """A runtime refusal (a bad setting, a prompt that does not fit) is the client's bad request; a shared pass
    that failed is the server's, named no further than its exception's type (its message is for the log)."""
    if isinstance(e, SharedPassError):
        return APIError(500, f"internal error ({type(e.__cause__).__name__}) in a decoding pass shared with other "
                        "requests; see the server's log", type="server_error")
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), code="context_length_exceeded", param="messages")
    # the field at fault, where the refusal names one the request has (temperature, top_p, seed, acceptance, ...)
    fields = [name for name in mentioned(e) if name in REQUEST_FIELDS]
    return APIError(400, str(e), param=fields[0] if fields else None)


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")


def busy(retry_after_s: int) -> APIError:
    return APIError(429, "the server's request queue is full; retry later", type="rate_limit_error",
                    code="queue_full", headers={"Retry-After": str(retry_after_s)})


UNION_BRANCHES = {"str", "int", "float", "bool", "list", "dict"}
NOT_AN_OBJECT = "the body must be a JSON object"


def is_json(content_type: str | None) -> bool:
    """Whether a Content-Type is one FastAPI parses the body of as JSON: application/json or application/*+json.
    Under any other (curl -d sends application/x-www-form-urlencoded; a browser's text/plain form posts need no
    CORS preflight) the body stays unparsed and is refused."""
    kind = (content_type or "").split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _is_branch(part) -> bool:
    """A union branch pydantic names in an error's location (`str`, `list[str]`), not a field."""
    return isinstance(part, str) and ("[" in part or part in UNION_BRANCHES)


def field_path(loc) -> str:
    """A field's dotted path, without the body prefix or the union branches pydantic names (`prompt.str`)."""
    return ".".join(str(p) for p in loc if p != "body" and not _is_branch(p))


def _relevance(error: dict) -> int:
    """Which of pydantic's errors to report (lowest first). A value outside a union fails every branch: a list of
    17 stop strings is "not a valid string" for `str` and "at most 16 items" for `list[str]`, and only the branch
    its type matched says what is wrong. So a broken constraint comes first, then a wrong type inside a value, and
    last a value that is not a branch's type at all."""
    if not error.get("type", "").endswith("_type"):
        return 0
    loc = error.get("loc", ())
    return 2 if loc and _is_branch(loc[-1]) else 1


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One message for pydantic's errors: the unsupported fields named together, else the first error."""
    extra = list(dict.fromkeys(field_path(e["loc"]) for e in errors if e.get("type") == "extra_forbidden"))
    if extra:
        return f"unsupported field(s): {', '.join(extra)}", extra[0]
    first = min(errors, key=_relevance)
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    where = field_path(first.get("loc", ()))
    if not where and first.get("type") in ("model_attributes_type", "dict_type"):
        return NOT_AN_OBJECT, None
    return (f"{where}: {first.get('msg')}" if where else f"the body: {first.get('msg')}"), where or None


def install(app: FastAPI) -> None:
    """Every error path of the app answers an OpenAI error object."""
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message, param = validation_message(list(e.errors()))
        if message == NOT_AN_OBJECT and not is_json(request.headers.get("content-type")):
            message = (f"the body must be a JSON object sent with 'Content-Type: application/json' (this request's "
                       f"Content-Type: {request.headers.get('content-type') or 'none'})")
        return APIError(400, message, param=param).response()

    @app.exception_handler(SpeccompileError)
    async def refused(_: Request, e: SpeccompileError):
        return from_runtime(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):  # unknown routes, wrong methods
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return APIError(e.status_code, str(e.detail), code=code, headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def crashed(_: Request, e: Exception):  # a bug: logged here with its traceback, never sent out
        log.exception("internal error")
        return APIError(500, f"internal error ({type(e).__name__}); see the server's log",
                        type="server_error").response()
