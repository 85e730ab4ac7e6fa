"""Ray Data engine of `omedge batch`: the same Worker and rows as the local pool, one
predictor per actor (map_batches with a callable class, concurrency=N, num_cpus=threads).

Finished chunks come back to the driver, which writes the part files, so resume and error
rows are the local pool's. An actor that dies (killed, out of memory) is restarted by Ray
and its batch retried; a batch that keeps killing its actor is dropped after ROUNDS tries
and its items are reported as failed rows, so the job always finishes.

Ray is told not to phone home (usage stats off) here, before it is imported, and its
workers get the same environment; nothing of this happens at `import omedge`."""
from __future__ import annotations

import os
import warnings
from dataclasses import replace

from .batch import ROUNDS, THREAD_VARS, Worker, WorkerSpec, result_row, split_cores, to_table
from .errors import OmedgeError

QUIET = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_PROMPT_ENABLED": "0",
         "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}


def quiet_ray() -> None:
    """Call before `import ray` / `ray.init`: no usage statistics, no prompt about them."""
    os.environ.update(QUIET)


def connect(address: str | None = None, **init) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one. True when
    this call started Ray (so the caller shuts it down again)."""
    quiet_ray()
    import ray
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, runtime_env={"env_vars": dict(QUIET)}, **init)
    return True


def plan(workers: int | None, threads: int | None) -> tuple[int, int]:
    """(actors, threads each) so that actors x threads <= the cluster's CPUs."""
    import ray
    return split_cores(max(1, int(ray.cluster_resources().get("CPU", 1))), workers, threads, "cluster's CPUs")


class BatchActor:
    """One predictor per Ray actor; a batch of items -> one Arrow IPC blob of result rows
    (a blob, so that chunks whose columns differ, e.g. all failed, need no common schema)."""

    def __init__(self, spec: WorkerSpec):
        self.worker = Worker(spec)

    def __call__(self, batch: dict) -> dict:
        import pyarrow as pa
        items, outputs = batch["item"].tolist(), batch["output"].tolist()
        table = to_table(self.worker.rows([(i, o or None) for i, o in zip(items, outputs)]))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return {"part": [sink.getvalue().to_pybytes()]}


def run_ray(spec: WorkerSpec, chunks: list, workers: int | None, threads: int | None, on_rows,
            address: str | None = None) -> None:
    """The chunks' items as a Ray Dataset through BatchActor; each result batch -> on_rows."""
    started = connect(address)
    import ray
    try:
        workers, threads = plan(workers, threads)
        spec = replace(spec, threads=threads)
        pending = {item: name for chunk in chunks for item, name in chunk}
        for table in _stream(spec, pending, len(chunks[0]), workers, threads):
            on_rows(table)
            for item in table.column("item").to_pylist():
                pending.pop(item, None)
        if pending:  # their batch was dropped after its actor died ROUNDS times
            on_rows(to_table([result_row(spec, item, error=f"the Ray worker processing it died {ROUNDS} times "
                                         "(killed or out of memory)") for item in pending]))
    finally:
        if started:
            ray.shutdown()


def _stream(spec, pending: dict, chunk_size: int, workers: int, threads: int):
    import pyarrow as pa
    import ray
    from ray.data import DataContext
    ctx = DataContext.get_current()
    saved = ctx.max_errored_blocks, ctx.enable_progress_bars
    ctx.max_errored_blocks, ctx.enable_progress_bars = -1, False  # a dead batch is reported, not fatal
    try:
        ds = ray.data.from_items([{"item": i, "output": n or ""} for i, n in pending.items()])
        with warnings.catch_warnings():  # bounded retries have no named parameter yet (Ray 2.60)
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(BatchActor, fn_constructor_args=(spec,), batch_size=chunk_size,
                                batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
                                num_cpus=threads, max_restarts=-1, max_task_retries=ROUNDS - 1,
                                runtime_env={"env_vars": {**QUIET, **{v: str(threads) for v in THREAD_VARS}}})
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for blob in batch.column("part").to_pylist():
                yield pa.ipc.open_stream(blob).read_all()
    except ray.exceptions.RayError as e:
        cause = _omedge_cause(e)
        if cause is not None:  # e.g. the bundle does not open on a worker: the job's error, not an item's
            raise cause from None
        raise
    finally:
        ctx.max_errored_blocks, ctx.enable_progress_bars = saved


def _omedge_cause(e: BaseException):
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OmedgeError):
            return e
        e = getattr(e, "cause", None) or e.__cause__
        seen += 1
    return None
