"""What `omedge serve` is told: one dataclass shared by the local server and Ray Serve.

Defaults are the safe ones: loopback, no token, bounded queues, small bodies.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None               # read from --token-file; required off loopback
    tls_cert: Path | None = None
    tls_key: Path | None = None
    device: str = "auto"
    backend: str = "auto"
    threads: int | None = None             # backend threads per model (replicas pin their own)
    max_batch: int = 8                     # dynamic batching for image models
    max_delay_ms: float = 5.0              # how long a request waits for others to join its batch
    max_queue: int = 64                    # requests waiting per model; beyond: 503 + Retry-After
    max_concurrency: int = 1               # batches running at once per model
    max_body_mb: float = 64.0              # request bodies beyond: 413
    max_pixels: int = 50_000_000           # decoded image size limit (decompression bombs)
    allow_dir: Path | None = None          # only folder clients may name server-side files in
    shutdown_timeout_s: float = 30.0       # on SIGTERM: how long running requests may take to finish
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """Refuse a configuration that would expose models without a token."""
        from ..errors import UsageError
        if self.host not in LOOPBACK and not self.token:
            raise UsageError(f"binding to {self.host} exposes the models to the network",
                             "give --token-file FILE (clients send 'Authorization: Bearer <token>'), "
                             "or keep the default --host 127.0.0.1")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise UsageError("TLS needs both --tls-cert and --tls-key")
        for what, value in (("max-batch", self.max_batch), ("max-queue", self.max_queue),
                            ("max-concurrency", self.max_concurrency)):
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"--{what} must be a positive integer, got {value!r}")
        if self.max_delay_ms < 0 or self.max_body_mb <= 0:
            raise UsageError("--max-delay-ms must be >= 0 and --max-body-mb > 0")
