"""The OpenAI chat-completions API for text-generation bundles (PULSE): `/v1/models` and
`/v1/chat/completions`, streamed as server-sent events when `stream` is true.

The prompt format is the bundle's own (the manifest's PULSE system text and turn
markers, applied by LLMPredictor.chat); a client's `system` messages are therefore not
used. Extensions: `top_k`, and `prompt_mode` ("qa" / "consultation", PULSE's prefixes).
`usage.completion_tokens` counts the streamed pieces (one per generated token once the
answer has begun). A client that disconnects mid-stream closes the generator: llama.cpp
stops after the token in flight, and the model's slot is given back.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import InputError
from .security import inflate

_DONE = object()
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
            "repeat_penalty": "repeat_penalty"}


def parse_chat(body: dict) -> dict:
    """The request fields omedge honours; anything it cannot honour is a 400."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise InputError("the request needs a 'model' (see GET /v1/models)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError("the request needs a non-empty 'messages' list")
    turns = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise InputError(f"messages[{i}] needs a role of system, user or assistant")
        content = msg.get("content")
        if isinstance(content, list):   # content parts: text only
            if not all(isinstance(c, dict) and c.get("type") == "text" for c in content):
                raise InputError(f"messages[{i}]: this model takes text content only")
            content = "".join(str(c.get("text", "")) for c in content)
        if not isinstance(content, str):
            raise InputError(f"messages[{i}] needs string content")
        if msg["role"] != "system":
            turns.append({"role": msg["role"], "content": content})
    if (body.get("n") or 1) != 1:
        raise InputError("n must be 1 here")
    if body.get("stop"):
        raise InputError("'stop' sequences are not supported; the model stops at its end-of-sequence token")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    sampling = {}
    for key, name in SAMPLING.items():
        if body.get(key) is not None:
            if not isinstance(body[key], (int, float)) or isinstance(body[key], bool) or body[key] < 0:
                raise InputError(f"{key} must be a non-negative number")
            sampling[name] = body[key]
    return {"model": body["model"], "messages": turns, "max_tokens": max_tokens, "sampling": sampling,
            "mode": body.get("prompt_mode"), "stream": bool(body.get("stream"))}


class Generation:
    """One generation holding the model's slot. close() is idempotent and never waits: the
    generator is closed on the model's own thread (after any token in flight), then the
    slot is released on the loop."""

    def __init__(self, m, pieces, loop, metrics):
        self.m, self.pieces, self.loop, self.metrics = m, pieces, loop, metrics
        self.done = self.closed = False
        self.count = 0

    async def next(self):
        piece = await self.loop.run_in_executor(self.m.executor, next, self.pieces, _DONE)
        if piece is _DONE:
            self.done = True
            return None
        self.count += 1
        self.metrics.tokens.labels(self.m.name).inc()
        return piece

    def close(self):
        if self.closed:
            return
        self.closed = True
        if not self.done:
            self.metrics.cancelled.labels(self.m.name).inc()
        future = self.m.executor.submit(self.pieces.close)
        future.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self.m.admission.release))


class GenerationStream(StreamingResponse):
    """Whatever ends the response (its end, a disconnect, a cancel before the first
    chunk), the generation is closed and the slot freed."""

    def __init__(self, content, generation: Generation, **kw):
        super().__init__(content, **kw)
        self.generation = generation

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


async def start(request: Request, metrics):
    """Parse, find the model, take a slot, start the generator (the prompt is checked
    against the context window here, so a too-long prompt is a 400 before streaming)."""
    from .app import served
    limit = int(request.app.state.config.max_body_mb * 2 ** 20)
    try:
        body = json.loads(inflate(await request.body(), request.headers.get("content-encoding"), limit))
    except ValueError as e:
        raise InputError(f"the request is not valid JSON ({e})") from None
    req = parse_chat(body)
    m = served(request, req["model"])
    if not m.kind.serves_chat:
        raise InputError(f"'{m.name}' is a {m.manifest.kind} model: use OIP infer", f"POST /v2/models/{m.name}/infer")
    with m.admission.admit() as ticket:
        await m.admission.acquire(ticket)
    loop = asyncio.get_running_loop()
    try:
        pieces = await loop.run_in_executor(m.executor, lambda: iter(m.predictor.chat(
            req["messages"], max_tokens=req["max_tokens"], stream=True, mode=req["mode"], **req["sampling"])))
    except BaseException:
        m.admission.release()
        raise
    return req, m, Generation(m, pieces, loop, metrics)


def chunk(cid: str, created: int, m, delta: dict, finish=None) -> str:
    data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": m.name,
            "system_fingerprint": m.sha256, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def add_openai_routes(app: FastAPI, config, metrics) -> None:
    from .app import HASH_HEADER, status_of

    @app.get("/v1/models")
    async def list_models(request: Request):
        data = [{"id": n, "object": "model", "created": int(m.path.stat().st_mtime), "owned_by": "omedge",
                 "manifest_sha256": m.sha256}
                for n, m in request.app.state.models.items() if m.kind.serves_chat]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0, cid, created = time.perf_counter(), f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        try:
            req, m, gen = await start(request, metrics)
        except Exception as e:
            m = getattr(request.state, "served", None)
            if m is not None:
                metrics.observe(m.name, "chat", status_of(e), time.perf_counter() - t0)
            raise
        headers = {HASH_HEADER: m.sha256}
        if req["stream"]:
            return GenerationStream(sse(gen, cid, created, m, req, t0), gen, media_type="text/event-stream",
                                    headers={**headers, "Cache-Control": "no-cache"})
        try:
            parts = []
            while (piece := await gen.next()) is not None:
                parts.append(piece)
        finally:
            gen.close()
        metrics.observe(m.name, "chat", 200, time.perf_counter() - t0)
        finish = "length" if gen.count >= req["max_tokens"] else "stop"
        prompt = len(await asyncio.get_running_loop().run_in_executor(   # the model's own thread
            m.executor, m.predictor.prompt_tokens, req["messages"], req["mode"]))
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": m.name,
            "system_fingerprint": m.sha256,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts).strip()},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": gen.count,
                      "total_tokens": prompt + gen.count}}, headers=headers)

    async def sse(gen: Generation, cid, created, m, req, t0):
        try:
            yield chunk(cid, created, m, {"role": "assistant", "content": ""})
            first = True
            while (piece := await gen.next()) is not None:
                piece, first = (piece.lstrip() if first else piece), False
                yield chunk(cid, created, m, {"content": piece})
            finish = "length" if gen.count >= req["max_tokens"] else "stop"
            yield chunk(cid, created, m, {}, finish)
            yield "data: [DONE]\n\n"
            metrics.observe(m.name, "chat", 200, time.perf_counter() - t0)
        finally:
            gen.close()
