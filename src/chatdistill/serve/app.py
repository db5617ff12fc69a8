"""The HTTP app: OpenAI-compatible routes, health, metrics, the chat page.

Routes stay thin; `serve/guard.py` checks requests before any route runs, `serve/completions.py`
holds the request-to-scheduler logic and `serve/protocol.py` the wire shapes. `run_server` is
what `chatdistill serve` calls.
"""

import logging
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from chatdistill.errors import UserError
from chatdistill.inference.engine import Engine
from chatdistill.inference.scheduler import Scheduler
from chatdistill.serve.completions import CompletionService
from chatdistill.serve.config import ServeConfig
from chatdistill.serve.errors import install_error_handlers
from chatdistill.serve.guard import LOOPBACK_NAMES, GuardMiddleware, HostPolicy
from chatdistill.serve.metrics import ServerMetrics
from chatdistill.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)

log = logging.getLogger("chatdistill.serve")
_STATIC = resources.files("chatdistill.serve") / "static"


def create_app(backend: Scheduler | Engine, cfg: ServeConfig) -> FastAPI:
    """The server app for a scheduler, or for an engine (then the app makes a scheduler with
    `cfg.max_batch`/`cfg.max_queue` and starts and stops it with the app)."""
    if isinstance(backend, Scheduler):
        scheduler, owned = backend, False
    else:
        scheduler, owned = (
            Scheduler(backend, max_batch=cfg.max_batch, max_queue=cfg.max_queue),
            True,
        )
    engine: Engine = scheduler.engine
    metrics = ServerMetrics(
        lambda: scheduler.num_running,
        lambda: scheduler.num_waiting,
        draft_counts=None if engine.draft is None else engine.draft.counts,
    )
    service = CompletionService(engine, scheduler, cfg, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if owned:
            scheduler.start()
        try:
            yield
        finally:
            if owned:
                scheduler.shutdown()

    app = FastAPI(
        title="chatdistill",
        summary="OpenAI-compatible chat API for a distilled student model",
        lifespan=lifespan,
        # No schema or docs pages: they would be open without a key and list every field.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    install_error_handlers(app, lambda status: metrics.rejected.labels(status=str(status)).inc())
    app.add_middleware(
        GuardMiddleware,
        hosts=HostPolicy(cfg.host, cfg.allowed_hosts),
        api_key=cfg.api_key,
        max_body_bytes=cfg.max_body_bytes,
        metrics=metrics,
    )

    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    async def list_models() -> ModelList:
        card = ModelCard(id=cfg.model_name, context_length=engine.context_length)
        return ModelList(data=[card])

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await service.chat(body, request)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await service.complete(body, request)

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the decode thread serves; 503 (with the reason) once it cannot."""
        body: dict[str, Any] = {
            "status": "ok" if scheduler.healthy else "unavailable",
            "model": cfg.model_name,
            "running": scheduler.num_running,
            "waiting": scheduler.num_waiting,
        }
        if not scheduler.healthy:
            body["error"] = scheduler.failure or "the decode thread is not running"
        return JSONResponse(body, status_code=200 if scheduler.healthy else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    index_html = (_STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(index_html)

    app.mount("/static", StaticFiles(directory=str(_STATIC)), name="static")
    return app


def _check_bindable(host: str, port: int) -> None:
    """Fail with a one-line error before the model loads when the address cannot be bound."""
    try:
        socket.create_server((host, port)).close()
    except OSError as e:
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host"
        ) from e


def run_server(
    model_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    request_timeout_s: float = 300.0,
    allowed_hosts: Sequence[str] = (),
    device: str | None = None,
    log_level: str = "info",
    draft: str | None = None,
    draft_tokens: int = 6,
    draft_int8: bool = False,
    draft_runtime: str = "torch",
) -> None:
    """Load the model in `model_dir` and serve it until interrupted; with `draft`, a lone request
    decodes speculatively with that model proposing `draft_tokens` a step."""
    _check_bindable(host, port)
    engine = Engine.load(model_dir, device=device)
    if draft is not None:
        from chatdistill.inference.speculative import load_draft

        load_draft(engine, draft, draft_tokens, int8=draft_int8, runtime=draft_runtime)
    name = model_name or Path(model_dir).resolve().name
    cfg = ServeConfig(
        model_name=name,
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        request_timeout_s=request_timeout_s,
        host=host,
        allowed_hosts=tuple(allowed_hosts),
    )
    if not api_key and host not in LOOPBACK_NAMES:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    app = create_app(engine, cfg)
    print(f"serving '{name}' on http://{host}:{port}  (chat page at /, API at /v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
