"""`omedge serve`: the Open Inference Protocol v2 and OpenAI APIs over bundles (FastAPI +
uvicorn; `app.create_app` is also what Ray Serve wraps). Nothing here is imported by
`import omedge`; FastAPI is needed only once a server is built."""
from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "run"]


def create_app(bundles, config):
    from .app import create_app as _create
    return _create(bundles, config)


def run(bundles, config):
    from .app import run as _run
    return _run(bundles, config)
