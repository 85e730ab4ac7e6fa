"""`omedge serve ... --ray --replicas N`: the very app of omedge.serve.app.create_app as a
Ray Serve deployment (serve.ingress), so the routes, validation, queues, token and
manifest hashes are the local server's; Ray adds replicas and the HTTP proxy.

Each replica builds its own app (predictors are opened in the replica, never pickled)
with its backend threads pinned: config.threads, else the cluster's CPUs / replicas, and
it reserves that many CPUs, so replicas never oversubscribe cores. Ray's own queue per
deployment is bounded too (max_queued_requests: beyond it the proxy answers 503)."""
from __future__ import annotations

import inspect
import time
from dataclasses import replace
from pathlib import Path

from ..errors import UsageError
from .config import ServeConfig

APP_NAME = "omedge"
DRAIN_S = 30.0      # graceful shutdown: running requests get this long to finish (config.shutdown_timeout_s)


def create_app(bundles, config):
    """The shared app factory (imported in the replica, where the predictors are opened)."""
    from .app import create_app as factory
    return factory(bundles, config)


def replica_threads(config: ServeConfig, replicas: int) -> int:
    """Backend threads per replica: config.threads, else an equal share of the cluster's CPUs."""
    import ray
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    threads = config.threads or max(1, cpus // replicas)
    if threads * replicas > cpus:
        raise UsageError(f"{replicas} replicas x {threads} threads is more than the cluster's {cpus} CPUs",
                         "lower --replicas or --threads")
    return threads


def build(bundles, config: ServeConfig, replicas: int, app_factory=None):
    """The bound deployment (an Application for serve.run). app_factory(bundles, config)
    -> ASGI app, default omedge.serve.app.create_app."""
    from ray import serve

    from ..batch import THREAD_VARS
    from ..batch_ray import QUIET
    if not isinstance(replicas, int) or replicas < 1:
        raise UsageError(f"--replicas must be a positive integer, got {replicas!r}")
    paths = checked_bundles(bundles)
    threads = replica_threads(config, replicas)
    cfg = replace(config, threads=threads)
    factory = app_factory or create_app

    def build_app():  # runs in each replica
        from omedge.batch import pin_threads
        pin_threads(threads)
        return factory(paths, cfg)

    env = {**QUIET, **{v: str(threads) for v in THREAD_VARS}}
    options = {"name": "OmedgeServer", "num_replicas": replicas,
               "ray_actor_options": {"num_cpus": threads, "runtime_env": {"env_vars": env}},
               "max_ongoing_requests": config.max_queue + config.max_batch * config.max_concurrency,
               "max_queued_requests": config.max_queue * replicas,
               "graceful_shutdown_timeout_s": getattr(config, "shutdown_timeout_s", DRAIN_S)}
    if "max_constructor_retry_count" in inspect.signature(serve.deployment).parameters:
        options["max_constructor_retry_count"] = 2   # a replica that cannot open its bundles fails fast
    return serve.deployment(serve.ingress(build_app)(), **options).bind()


def checked_bundles(bundles) -> list[str]:
    """NAME=PATH / PATH as the app names them, with absolute paths (replicas may start
    elsewhere); each manifest is read here, so a wrong path is a clean error before deploying."""
    from ..manifest import read_manifest
    from .app import model_names
    out = []
    for name, path in model_names(bundles):
        read_manifest(path)
        out.append(f"{name}={Path(path).resolve()}")
    return out


def http_options(config: ServeConfig) -> dict:
    options = {"host": config.host, "port": config.port}
    if config.tls_cert:
        options.update(ssl_certfile=str(config.tls_cert), ssl_keyfile=str(config.tls_key))
    return options


def run(bundles, config: ServeConfig, replicas: int, address: str | None = None, block: bool = True,
        app_factory=None) -> str:
    """Deploy on the Ray cluster at `address` (or RAY_ADDRESS; else a new local one) and,
    with block, serve until Ctrl-C / SIGTERM, then drain and shut down. Returns the URL."""
    from ..batch_ray import connect
    config.check()
    started = connect(address)
    try:
        from ray import serve
        serve.start(http_options=http_options(config))
        serve.run(build(bundles, config, replicas, app_factory), name=APP_NAME, route_prefix="/", blocking=False)
    except BaseException:
        shutdown(started)
        raise
    url = f"{'https' if config.tls_cert else 'http'}://{config.host}:{config.port}"
    if not block:
        return url
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:  # the CLI turns SIGTERM into this too
        pass
    finally:
        shutdown(started)
    return url


def shutdown(stop_ray: bool = False) -> None:
    """Stop Serve (replicas finish what they run, up to DRAIN_S); stop Ray if we started it."""
    import ray
    from ray import serve
    if ray.is_initialized():
        serve.shutdown()
        if stop_ray:
            ray.shutdown()
