"""Run side: numpy + one backend. Never imports torch."""
from __future__ import annotations


def load(bundle, device: str = "auto", backend: str = "auto", threads: int | None = None,
         artifact: str | None = None, mode: str = "latency"):
    """Open a bundle (manifest and file hashes checked first) on the best verified
    backend/device here, as its kind's predictor. Every argument is honoured or the
    call raises, for every kind.

    mode: "latency" answers one request as fast as possible; "throughput" keeps
    several requests in flight (OpenVINO streams) for tile batches and streams."""
    from ..bundle import reading
    from ..kinds import get_kind
    from ..manifest import read_manifest
    with reading(bundle):  # an overwrite waits until the backend has read its files
        kind = get_kind(read_manifest(bundle).kind)
        return kind.open(bundle, device=device, backend=backend, threads=threads, artifact=artifact, mode=mode)
