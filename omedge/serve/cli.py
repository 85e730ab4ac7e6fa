"""`omedge serve BUNDLE...`: flags -> ServeConfig -> the local server (uvicorn) or, with
--ray, a Ray Serve deployment of the same app. Importing this module imports neither
FastAPI nor Ray, so `omedge --help` works without the serve extra."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import positive_int
from ..errors import UsageError
from .config import ServeConfig


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("serve", help="serve bundles: Open Inference Protocol v2 REST, OpenAI chat API for "
                              "LLMs, Prometheus /metrics")
    s.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle folders, or NAME=PATH to choose the name")
    d = ServeConfig()
    s.add_argument("--host", default=d.host, help="address to bind (default loopback; others need --token-file)")
    s.add_argument("--port", type=int, default=d.port)
    s.add_argument("--token-file", type=Path, help="file holding the bearer token clients must send")
    s.add_argument("--tls-cert", type=Path, help="PEM certificate (with --tls-key): HTTPS")
    s.add_argument("--tls-key", type=Path)
    s.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda", "gpu", "npu"])
    s.add_argument("--backend", default=d.backend, choices=["auto", "onnxruntime", "openvino", "llama.cpp"])
    s.add_argument("--threads", type=positive_int, help="backend threads per model")
    s.add_argument("--max-batch", type=positive_int, default=d.max_batch, help="dynamic batching: rows per batch")
    s.add_argument("--max-delay-ms", type=float, default=d.max_delay_ms,
                   help="dynamic batching: how long a request waits for others")
    s.add_argument("--max-queue", type=positive_int, default=d.max_queue, help="waiting requests per model (then 503)")
    s.add_argument("--max-concurrency", type=positive_int, default=d.max_concurrency, help="batches running per model")
    s.add_argument("--max-body-mb", type=float, default=d.max_body_mb, help="request body limit (then 413)")
    s.add_argument("--allow-dir", type=Path, help="the only folder clients may name server-side files in")
    s.add_argument("--ray", action="store_true", help="deploy on a Ray cluster with Ray Serve")
    s.add_argument("--replicas", type=positive_int, default=1, help="with --ray: replicas of the app")
    s.set_defaults(func=cmd_serve)
    return s


def config_from(args) -> ServeConfig:
    from .security import read_token
    if args.allow_dir is not None and not args.allow_dir.is_dir():
        raise UsageError(f"--allow-dir {args.allow_dir} is not a folder")
    if args.replicas != 1 and not args.ray:
        raise UsageError("--replicas needs --ray", "locally, use --max-concurrency for parallel batches")
    config = ServeConfig(host=args.host, port=args.port, token=read_token(args.token_file) if args.token_file else None,
                         tls_cert=args.tls_cert, tls_key=args.tls_key, device=args.device, backend=args.backend,
                         threads=args.threads, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                         max_queue=args.max_queue, max_concurrency=args.max_concurrency, max_body_mb=args.max_body_mb,
                         allow_dir=args.allow_dir)
    config.check()
    return config


def cmd_serve(args) -> int:
    config = config_from(args)
    missing = [b for b in args.bundles if not (Path(b).is_dir() or Path(b.split("=", 1)[-1]).is_dir())]
    if missing:
        raise UsageError(f"bundle folder(s) not found: {', '.join(missing)}")
    if args.ray:
        from .ray_deploy import run as ray_run
        ray_run(args.bundles, config, args.replicas)
        return 0
    from .app import run
    run(args.bundles, config)
    return 0
