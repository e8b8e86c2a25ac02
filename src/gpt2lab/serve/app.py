"""The HTTP server: OpenAI's completions API (``POST /v1/completions``, ``GET /v1/models``), ``GET /health``,
the page at ``/`` and its attention view (``POST /v1/attention``), on FastAPI.

Every refusal is a 4xx (5xx for the server's own faults) with OpenAI's error object, one line naming the
field. The body is bounded before it is parsed; with an API key, every ``/v1`` route wants
``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt2lab.loading import load_model_and_tokenizer
from gpt2lab.serve.attention_view import attention_view
from gpt2lab.serve.batching import Scheduler
from gpt2lab.serve.completions import ClientGone, ServedModel, check_request, complete, stream, submit
from gpt2lab.serve.schema import (
    ATTENTION_MAX_TOKENS,
    APIError,
    AttentionRequest,
    CompletionRequest,
    Limits,
    validation_message,
)

STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` is answered 413 before anything reads it whole (by its
    Content-Length, or while a chunked upload arrives)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _too_large(self.max_bytes)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise APIError(413, f"the request body is over the limit of {self.max_bytes} bytes")
            return message

        return await self.app(scope, limited_receive, send)


def _too_large(max_bytes: int) -> Response:
    error = APIError(413, f"the request body is over the limit of {max_bytes} bytes")
    return JSONResponse(error.body(), status_code=413)


def build_app(served: dict[str, ServedModel], limits: Limits, api_key: str | None = None) -> FastAPI:
    """The app for models already loaded (``load_models``); their schedulers stop when the app shuts down."""

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has already waited for the in-flight requests; end the workers
        for model in served.values():
            await run_in_threadpool(model.scheduler.stop, 30)

    app = FastAPI(title="gpt2lab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served, app.state.limits = served, limits
    _add_error_handlers(app)
    _add_api_routes(app, served, limits, api_key)
    _add_page_routes(app)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        message, param = validation_message(list(err.errors()))
        return JSONResponse(APIError(400, message, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {err.detail}"
        return JSONResponse(APIError(err.status_code, message, None, kind).body(), status_code=err.status_code)


def _served_model(served: dict[str, ServedModel], name: str) -> ServedModel:
    if name not in served:
        raise APIError(
            404,
            f"model: no model named {name!r}; this server has {', '.join(sorted(served))}",
            "model",
            code="model_not_found",
        )
    return served[name]


def _check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise APIError(
            401,
            "Authorization: a valid API key is required (Bearer KEY)",
            None,
            "authentication_error",
            "invalid_api_key",
        )


def _add_api_routes(app: FastAPI, served: dict[str, ServedModel], limits: Limits, api_key: str | None) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok", "models": {name: m.scheduler.load() for name, m in served.items()}}

    @app.get("/v1/models")
    async def models(request: Request):
        _check_key(request, api_key)
        return {"object": "list", "data": [m.info() for m in served.values()]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_key(request, api_key)
        model = _served_model(served, body.model)
        prompts = check_request(model, body, limits)
        rows, events = submit(model, body, prompts)
        if not body.stream:
            try:
                return await complete(model, rows, events, request.is_disconnected)
            except ClientGone:  # nobody reads this answer; its rows are already cancelled
                return Response(status_code=499)
        sse = stream(model, rows, events, _never_disconnected)  # Starlette cancels the stream on disconnect
        return StreamingResponse(sse, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/attention")
    async def attention(body: AttentionRequest, request: Request):
        _check_key(request, api_key)
        model = _served_model(served, body.model)
        return await run_in_threadpool(_attention, model, body)


async def _never_disconnected() -> bool:
    return False


def _attention(served: ServedModel, body: AttentionRequest) -> dict:
    config = served.model.config
    if body.layer >= config.n_layer:
        raise APIError(400, f"layer: {body.layer} is out of range (the model has {config.n_layer} layers)", "layer")
    if body.head >= config.n_head:
        raise APIError(400, f"head: {body.head} is out of range (the model has {config.n_head} heads)", "head")
    ids = served.tokenizer.encode(body.prompt)
    if not ids or len(ids) > min(ATTENTION_MAX_TOKENS, config.block_size):
        limit = min(ATTENTION_MAX_TOKENS, config.block_size)
        raise APIError(400, f"prompt: {len(ids)} tokens; the attention view takes 1 to {limit}", "prompt")
    started = time.perf_counter()
    with served.scheduler.model_lock:  # between two decoding steps, never during one
        view = attention_view(served.model, served.tokenizer, ids, body.layer, body.head)
    return {**view, "model": served.name, "seconds": round(time.perf_counter() - started, 4)}


def _add_page_routes(app: FastAPI) -> None:
    static = resources.files("gpt2lab.serve") / "static"

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}")
    async def static_file(name: str):
        if name not in STATIC_FILES:
            raise APIError(404, f"no static file {name!r}", None, "not_found_error")
        return Response((static / name).read_text(encoding="utf-8"), media_type=STATIC_FILES[name])


def load_models(specs: dict[str, str], limits: Limits, dtype: str = "float32", device: str = "cpu") -> dict:
    """Load every model named in ``specs`` (name -> path or hub id) and start its scheduler."""
    served = {}
    for name, path in specs.items():
        model, tokenizer = load_model_and_tokenizer(path, dtype=dtype, device=device)
        model.eval()
        scheduler = Scheduler(model, tokenizer, limits.max_batch, limits.max_queue)
        served[name] = ServedModel(name, model, tokenizer, scheduler, int(time.time()))
    return served


def stop_all(served: dict[str, ServedModel]) -> None:
    for model in served.values():
        model.scheduler.stop(30)
