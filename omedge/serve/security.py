"""What keeps a served model safe to expose: loopback by default (ServeConfig.check), a
bearer token compared in constant time, request size limits (also after gzip/deflate, so a
compressed bomb is refused), client paths only inside --allow-dir, and error bodies
without tracebacks or server paths.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import zlib
from pathlib import Path

from ..errors import InputError, UsageError

PUBLIC_PATHS = ()   # every endpoint needs the token when one is set (health probes can send headers)


def read_token(path) -> str:
    """The token from --token-file: one line, at least 16 characters."""
    p = Path(path)
    try:
        token = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the token file {p}: {getattr(e, 'strerror', None) or e}") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise UsageError(f"the token in {p} must be one word of at least 16 characters",
                         "e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE")
    return token


def token_ok(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time: digests of equal length,
    so neither the content nor the length of the token leaks through timing."""
    given = header[7:].strip() if header and header[:7].lower() == "bearer " else ""
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(token.encode()).digest())


def ssl_options(config) -> dict:
    """uvicorn's TLS arguments from --tls-cert / --tls-key (both files must exist)."""
    if not config.tls_cert:
        return {}
    for what, f in (("--tls-cert", config.tls_cert), ("--tls-key", config.tls_key)):
        if not Path(f).is_file():
            raise UsageError(f"{what} {f} is not a file")
    return {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)}


def client_paths(items: list[bytes], config) -> list[Path]:
    """Server-side files a client names: refused unless --allow-dir is set, and then only
    regular files inside that folder once every '..' and symlink is resolved."""
    root = getattr(config, "allow_dir", None)
    if root is None:
        raise InputError("server-side paths are disabled on this server",
                         "send the file's bytes instead (the BYTES input), or start the server with --allow-dir")
    root = Path(root).resolve()
    out = []
    for i, raw in enumerate(items):
        try:
            rel = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"path[{i}] is not UTF-8") from None
        p = (root / rel).resolve()
        if "\x00" in rel or not p.is_relative_to(root) or not p.is_file():
            raise InputError(f"path[{i}] is not a file inside the allowed folder",
                             "give a path relative to the server's --allow-dir")
        out.append(p)
    return out


def scrub(message: str, config) -> str:
    """A client never learns where the server keeps files: the allowed folder is named as such."""
    root = getattr(config, "allow_dir", None)
    if root is not None:
        message = message.replace(str(Path(root).resolve()), "<allow-dir>").replace(str(root), "<allow-dir>")
    return message


def error_body(path: str, status: int, message: str) -> bytes:
    """OIP errors are {"error": "..."} (tritonclient reads that); OpenAI's carry an object."""
    if path.startswith("/v1/"):
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                503: "server_overloaded"}.get(status, "invalid_request_error" if status < 500 else "server_error")
        return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    return json.dumps({"error": message}).encode()


class TooLarge(Exception):
    pass


def inflate(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Content-Encoding gzip / deflate (tritonclient's request compression), inflated to at
    most `limit` bytes: a small bomb cannot grow past the body limit in memory."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise InputError(f"unsupported Content-Encoding {encoding!r}", "send gzip, deflate or identity")
    d = zlib.decompressobj(31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise InputError(f"the {encoding} body cannot be inflated ({e})") from None
    if len(out) > limit or d.unconsumed_tail:
        raise TooLarge(f"the inflated body is over the {limit // 2 ** 20} MiB limit")
    return out


class Guard:
    """ASGI middleware in front of everything: 401 without the token, 413 when the body is
    (or becomes, while streaming in) larger than the limit. Pure ASGI, so streamed
    responses pass through untouched."""

    def __init__(self, app, token: str | None, max_body: int):
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope.get("path", "")
        if self.token and path not in PUBLIC_PATHS and not token_ok(headers.get("authorization"), self.token):
            return await reply(send, path, 401, "missing or wrong bearer token",
                               [(b"www-authenticate", b'Bearer realm="omedge"')])
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await reply(send, path, 413, f"request body over the {self.max_body // 2 ** 20} MiB limit")
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise TooLarge(f"request body over the {self.max_body // 2 ** 20} MiB limit")
            return message
        await self.app(scope, limited, send)


async def reply(send, path: str, status: int, message: str, extra=()) -> None:
    body = error_body(path, status, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})
