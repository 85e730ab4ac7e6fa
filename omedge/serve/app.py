"""`omedge serve`: bundles behind the Open Inference Protocol v2 (REST) and, for LLMs, the
OpenAI chat-completions API, with Prometheus metrics.

Why FastAPI + uvicorn rather than KServe's `ModelServer`: KServe's Python server pulls in
its own stack (grpcio, protobuf, kubernetes client, cloudevents, orjson, a pinned FastAPI
among them), which is heavy to carry onto an offline device, and its model class, its
batcher and its protocol handlers would sit between omedge's kinds and the wire; what
KServe's OIP REST layer does is a small codec here (oip.py), so one app serves both
protocols and the same `create_app()` object runs under Ray Serve's `serve.ingress`
unchanged (models load in the app's lifespan, so a replica loads its own). gRPC is not
cheap on this stack: FastAPI has no gRPC, so it would mean a second server (grpcio +
the OIP protobufs) with its own auth, limits and batching; it is left out, and the
tritonclient.http / KServe REST clients are the supported ones.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import BackendUnavailableError, InputError, OmedgeError, UsageError
from . import oip
from .batching import Batcher, QueueFull, Slots
from .config import ServeConfig
from .metrics import ServeMetrics
from .security import Guard, TooLarge, error_body, inflate, scrub

log = logging.getLogger("omedge.serve")
HASH_HEADER = "omedge-manifest-sha256"


class UnknownModel(Exception):
    pass


class Served:
    """One loaded bundle: its predictor, kind, manifest hash and admission queue."""

    def __init__(self, name: str, path: Path, predictor):
        from ..kinds import get_kind
        from ..manifest import stored_hash
        self.name, self.path, self.predictor = name, path, predictor
        self.manifest = predictor.manifest
        self.kind = get_kind(self.manifest.kind)
        self.sha256 = stored_hash(path)
        self.info = predictor.describe()
        self.inputs, self.outputs = self.kind.serve_inputs(self.manifest), self.kind.serve_outputs(self.manifest)
        self.admission = None

    def start(self, config: ServeConfig, metrics: ServeMetrics) -> None:
        """Queues need the running loop: made at startup."""
        if self.kind.serves_oip:
            self.admission = Batcher(self.name, lambda feeds: self.kind.serve_run(self.predictor, feeds,
                                                                                   config.max_batch),
                                     config.max_batch, config.max_delay_ms, config.max_queue,
                                     config.max_concurrency, merge=self.kind.serve_merge,
                                     on_batch=metrics.batch_rows.labels(self.name).observe)
        else:   # one llama.cpp context answers one request at a time, on its own thread
            self.admission = Slots(self.name, config.max_queue, 1)
            self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"omedge-{self.name}")
        metrics.add_model(self.name, self.manifest.kind, self.info, self.sha256, self.admission)

    async def close(self) -> None:
        if isinstance(self.admission, Slots):
            await self.admission.drain()
            self.executor.shutdown(wait=True)
        else:
            await self.admission.close()

    def metadata(self) -> dict:
        i = self.info
        return {"name": self.name, "versions": ["1"], "platform": f"omedge_{i.get('format')}_{i.get('backend')}",
                "inputs": self.inputs, "outputs": self.outputs,
                "parameters": {"manifest_sha256": self.sha256, "kind": self.manifest.kind,
                               "model": self.manifest.model["id"], "variant": self.manifest.model["variant"],
                               "backend": i.get("backend"), "device": i.get("device"),
                               "precision": i.get("precision"), "labels": self.manifest.labels}}


def model_names(bundles: list) -> list[tuple[str, Path]]:
    """`path` (named after its folder, without .omedge) or `name=path`; names are unique."""
    out = []
    for b in bundles:
        text = str(b)
        name, _, path = text.partition("=") if "=" in text and not Path(text).exists() else ("", "", text)
        path = Path(path)
        name = name or (path.name.removesuffix(".omedge"))
        if not name or "/" in name:
            raise UsageError(f"cannot name the model served from {text!r}", "use NAME=PATH")
        if name in [n for n, _ in out]:
            raise UsageError(f"two bundles would both be served as '{name}'", "name them: NAME=PATH")
        out.append((name, path))
    return out


def load_models(bundles: list, config: ServeConfig) -> dict[str, Served]:
    """Open every bundle (hashes checked) on the configured device/backend."""
    import omedge
    models = {}
    for name, path in model_names(bundles):
        p = omedge.load(path, device=config.device, backend=config.backend, threads=config.threads)
        models[name] = Served(name, path, p)
        log.info("serving %s from %s: %s on %s", name, path.name, models[name].info.get("backend"),
                 models[name].info.get("device"))
    return models


def create_app(bundles: list, config: ServeConfig, models: dict | None = None) -> FastAPI:
    """The ASGI app. Models load in its lifespan (unless `models` are given, already loaded),
    so the same object works under uvicorn and under Ray Serve's ingress."""
    config.check()
    model_names(bundles)   # a naming mistake fails now, not at startup
    metrics = ServeMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = models if models is not None else await run_in_threadpool(load_models, bundles, config)
        for m in loaded.values():
            m.start(config, metrics)
        app.state.models, app.state.ready = loaded, True
        try:
            yield
        finally:
            app.state.ready = False
            await asyncio.gather(*(m.close() for m in loaded.values()))

    app = FastAPI(title="omedge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)   # the docs pages load scripts from a CDN: never offline
    app.state.config, app.state.metrics, app.state.models, app.state.ready = config, metrics, {}, False
    app.add_middleware(Guard, token=config.token, max_body=int(config.max_body_mb * 2 ** 20))
    install_errors(app, config)
    add_oip_routes(app, config, metrics)
    from .openai_api import add_openai_routes
    add_openai_routes(app, config, metrics)
    return app


def served(request: Request, name: str) -> Served:
    m = request.app.state.models.get(name)
    if m is None:
        raise UnknownModel(f"no model named '{name}' here; serving: {', '.join(request.app.state.models) or 'none'}")
    request.state.served = m
    return m


def status_of(e: Exception) -> int:
    if isinstance(e, (InputError, UsageError)):
        return 400
    if isinstance(e, UnknownModel):
        return 404
    if isinstance(e, TooLarge):
        return 413
    if isinstance(e, (QueueFull, BackendUnavailableError)):
        return 503
    if isinstance(e, HTTPException):
        return e.status_code
    return 500


def error_response(request: Request, e: Exception, config: ServeConfig) -> Response:
    status = status_of(e)
    if isinstance(e, OmedgeError):
        message = e.message + (f" ({e.hint})" if e.hint else "")
    elif isinstance(e, HTTPException):
        message = str(e.detail)
    elif status < 500:
        message = str(e)
    else:   # logged here with its traceback; the client gets a reference, never the trace
        ref = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s", ref, request.url.path, exc_info=e)
        message = f"internal server error (reference {ref} in the server log)"
    headers = {}
    if isinstance(e, QueueFull):
        headers["Retry-After"] = str(e.retry_after)
    m = getattr(request.state, "served", None)
    if m is not None:
        headers[HASH_HEADER] = m.sha256
    return Response(error_body(request.url.path, status, scrub(message, config)), status,
                    headers=headers, media_type="application/json")


def install_errors(app: FastAPI, config: ServeConfig) -> None:
    async def handler(request: Request, e: Exception):
        return error_response(request, e, config)
    for cls in (OmedgeError, UnknownModel, TooLarge, QueueFull, HTTPException, Exception):
        app.add_exception_handler(cls, handler)


def tracked(metrics: ServeMetrics, endpoint: str):
    """Count and time a model endpoint by its final status code."""
    def wrap(fn):
        @functools.wraps(fn)
        async def inner(request: Request, name: str, **kw):
            t0, code = time.perf_counter(), 500
            try:
                response = await fn(request, name, **kw)
                code = response.status_code
                return response
            except Exception as e:
                code = status_of(e)
                raise
            finally:
                if name in request.app.state.models:
                    metrics.observe(name, endpoint, code, time.perf_counter() - t0)
        return inner
    return wrap


def add_oip_routes(app: FastAPI, config: ServeConfig, metrics: ServeMetrics) -> None:
    limit = int(config.max_body_mb * 2 ** 20)

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready(request: Request):
        ok = request.app.state.ready
        return JSONResponse({"ready": ok}, 200 if ok else 503)

    @app.get("/v2")
    async def server_metadata(request: Request):
        return {"name": "omedge", "version": __version__, "extensions": ["binary_tensor_data"],
                "models": {n: m.sha256 for n, m in request.app.state.models.items()}}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(request: Request, name: str, version: str = "1"):
        m = served(request, name)
        return JSONResponse(m.metadata(), headers={HASH_HEADER: m.sha256})

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(request: Request, name: str, version: str = "1"):
        m = served(request, name)
        ok = request.app.state.ready and not m.admission.closing
        return JSONResponse({"name": name, "ready": ok}, 200 if ok else 503, headers={HASH_HEADER: m.sha256})

    @tracked(metrics, "infer")
    async def infer(request: Request, name: str, version: str = "1"):
        m = served(request, name)
        if not m.kind.serves_oip:
            m.kind.decode_request(m.predictor, {}, config)   # says which API serves it
        with m.admission.admit() as ticket:
            body = inflate(await request.body(), request.headers.get("content-encoding"), limit)
            req, tensors, _ = oip.parse_request(body, request.headers.get("inference-header-content-length"))
            names, binary = oip.requested_outputs(req, [o["name"] for o in m.outputs])
            feeds = await run_in_threadpool(m.kind.decode_request, m.predictor, tensors, config)
            outputs = await m.admission.submit(ticket, feeds)
        outputs = m.kind.encode_response(m.predictor, outputs)
        missing = [n for n in names if n not in outputs]
        if missing and req.get("outputs"):
            raise InputError(f"output(s) {missing} are not produced for this input", f"it gives {', '.join(outputs)}")
        names = [n for n in names if n in outputs]   # e.g. a raw-input path returning other tensors
        payload, header_length = oip.encode_response(name, req, outputs, names, binary,
                                                     {"manifest_sha256": m.sha256})
        headers = {HASH_HEADER: m.sha256}
        if header_length is not None:
            headers["Inference-Header-Content-Length"] = str(header_length)
        return Response(payload, 200, headers=headers,
                        media_type="application/octet-stream" if header_length is not None else "application/json")

    app.add_api_route("/v2/models/{name}/infer", infer, methods=["POST"])
    app.add_api_route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"])

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)


def run(bundles: list, config: ServeConfig) -> None:
    """Serve until SIGINT/SIGTERM; then running requests finish (up to
    config.shutdown_timeout_s) before the models close."""
    import uvicorn

    from .security import ssl_options
    config.check()
    tls = ssl_options(config)
    models = load_models(bundles, config)   # a bad bundle is a clean CLI error, before binding
    app = create_app(bundles, config, models=models)
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level="info", server_header=False,
                        proxy_headers=False, timeout_graceful_shutdown=config.shutdown_timeout_s, **tls)
    uvicorn.Server(uv).run()
