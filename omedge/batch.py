"""`omedge batch`: one bundle over an archive (a folder, a file list or a manifest CSV), one
row per item in Parquet (segmentation: NIfTI label maps + a Parquet index).

- An item that cannot be read is a row with ok=false and its message, never the job's end.
- Resume: each finished chunk is an atomically renamed part (OUT.parts/part-NNNNN.parquet); a
  rerun skips items done with the same bundle (manifest sha256), retries the rest, then merges.
- One Worker (one predictor, threads pinned) for both engines: the local process pool here,
  Ray Data in omedge.batch_ray; workers x threads never exceeds the cores."""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .batch_inputs import Inputs, label_map_names, read_inputs
from .errors import OmedgeError, UsageError

BASE = ("item", "ok", "error", "seconds", "bundle_sha256", "finished_at")
ROUNDS = 3          # a chunk whose worker process died is run again, at most this often in all
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def cores() -> int:
    """CPUs this process may use (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pin_threads(threads: int) -> None:  # numpy & co. in a worker; the backend gets `threads` itself
    os.environ.update({var: str(threads) for var in THREAD_VARS})


# -- the work: one predictor per worker --------------------------------------------------
@dataclass
class WorkerSpec:
    """What a worker needs to open its predictor: small and picklable (sent to processes / actors)."""
    bundle: str
    sha256: str
    device: str = "auto"
    backend: str = "auto"
    threads: int = 1
    batch_size: int = 8
    out_dir: str | None = None        # segmentation: where label maps go


def result_row(spec: WorkerSpec, item: str, seconds: float = 0.0, error: str | None = None, **values) -> dict:
    return {"item": item, "ok": error is None, "error": error, "seconds": seconds, "bundle_sha256": spec.sha256,
            "finished_at": datetime.now(timezone.utc), **values}


def describe_error(e: BaseException) -> str:
    """One line for the error column: the omedge message, or the exception's type and text (never a traceback)."""
    return e.message if isinstance(e, OmedgeError) else f"{type(e).__name__}: {e}"[:500]


class Worker:
    """Opens the bundle once, then turns chunks of items into rows."""

    def __init__(self, spec: WorkerSpec):
        from .kinds import get_kind
        from .runtime import load
        pin_threads(spec.threads)
        self.spec, self.predictor = spec, load(spec.bundle, device=spec.device, backend=spec.backend,
                                               threads=spec.threads)
        self.segmenting = get_kind(self.predictor.manifest.kind).batch_writes_files

    def rows(self, chunk: list[tuple[str, str | None]]) -> list[dict]:
        if self.segmenting:
            return [self._segment(item, name) for item, name in chunk]
        size = self.spec.batch_size
        return [r for k in range(0, len(chunk), size) for r in self._predict([i for i, _ in chunk[k:k + size]])]

    def _predict(self, items: list[str]) -> list[dict]:
        """A mini-batch in one run; if any item fails, each item alone, so the error is its own."""
        t0 = time.perf_counter()
        try:
            out = self.predictor.predict(items, batch_size=len(items), return_dict=True)
        except Exception as e:  # noqa: BLE001 - any failure of an item is that item's row, never the job's end
            if len(items) == 1:
                return [result_row(self.spec, items[0], time.perf_counter() - t0, describe_error(e))]
            return [r for item in items for r in self._predict([item])]
        each = (time.perf_counter() - t0) / len(items)
        return [result_row(self.spec, item, each, **{("label" if k == "labels" else k):
                                                      (v[i] if k == "labels" else np.asarray(v[i]))
                                                      for k, v in out.items()})
                for i, item in enumerate(items)]

    def _segment(self, item: str, name: str) -> dict:
        from .io.volume import write_labels
        from .runtime.volume import class_volumes
        t0 = time.perf_counter()
        try:
            labels, vol = self.predictor.segment(item, batch_size=self.spec.batch_size)
            target = write_labels(labels, vol, Path(self.spec.out_dir) / name, overwrite=True)
        except Exception as e:  # noqa: BLE001 - as in _predict
            return result_row(self.spec, item, time.perf_counter() - t0, describe_error(e))
        return result_row(self.spec, item, time.perf_counter() - t0, output=str(target), shape=list(vol.data.shape),
                          volumes_ml=json.dumps(class_volumes(labels, vol, self.predictor.labels)))


# -- local process pool ----------------------------------------------------------------
_WORKER: dict = {}


def _init_process(spec: WorkerSpec) -> None:
    try:
        _WORKER["worker"] = Worker(spec)
    except Exception as e:  # noqa: BLE001 - reported by the first chunk: the job stops with this message
        _WORKER["error"] = e


def _process_chunk(chunk):
    if "error" in _WORKER:
        raise _WORKER["error"]
    return _WORKER["worker"].rows(chunk)


def run_local(spec: WorkerSpec, chunks: list, workers: int, on_rows) -> None:
    """Chunks over `workers` spawned processes (one in-process worker when workers == 1).
    The chunks of a process that died (killed, out of memory) run again in a fresh pool,
    alone, so one that kills its worker takes no other with it; after ROUNDS deaths its
    items are reported failed."""
    if workers == 1:
        worker = Worker(spec)
        for chunk in chunks:
            on_rows(to_table(worker.rows(chunk)))
        return
    queue = deque((chunk, 0) for chunk in chunks)   # (chunk, times its process died)
    while queue:
        for chunk, deaths in reversed(_pool_pass(spec, queue, workers, on_rows)):
            if deaths + 1 < ROUNDS:
                queue.appendleft((chunk, deaths + 1))
            else:
                on_rows(to_table([result_row(spec, item, error=f"its worker process died {ROUNDS} times (killed "
                                             "or out of memory)") for item, _ in chunk]))


def _pool_pass(spec: WorkerSpec, queue: deque, workers: int, on_rows) -> list:
    """Run chunks from the queue, at most `workers` at once (a retried one alone), until it
    is empty or the pool breaks; returns the chunks that were in flight when it broke."""
    import multiprocessing
    inflight: dict = {}
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_process, initargs=(spec,))
    broken = False
    try:
        while queue or inflight:
            while queue and len(inflight) < workers and not (inflight and (queue[0][1] or
                                                                          any(d for _, d in inflight.values()))):
                chunk, deaths = queue.popleft()
                inflight[pool.submit(_process_chunk, chunk)] = (chunk, deaths)
            done = wait(inflight, return_when=FIRST_COMPLETED)[0]
            for f in done:
                if not isinstance(f.exception(), BrokenProcessPool):   # other errors: the job's (f.result raises)
                    on_rows(to_table(f.result()))
                    del inflight[f]
            if len(inflight) and any(f in inflight for f in done):
                broken = True
                return list(inflight.values())
        return []
    finally:
        _close_pool(pool, broken)


def _close_pool(pool: ProcessPoolExecutor, broken: bool) -> None:
    """A pool whose worker was killed can hang in shutdown(wait=True) (a CPython
    executor issue): its surviving processes are ended first, and nothing waits."""
    if not broken:
        pool.shutdown(wait=True)
        return
    for process in list(getattr(pool, "_processes", {}).values()):
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


# -- parts, resume and the merged output ---------------------------------------------------
class Store:
    """OUT (a .parquet file, or for segmentation a folder holding index.parquet and the
    label maps) and its part files."""

    def __init__(self, out, segmenting: bool):
        self.out, self.next_part = Path(out), 0
        if segmenting and self.out.exists() and not self.out.is_dir():
            raise UsageError(f"{self.out} is a file; a segmentation batch writes a folder of label maps",
                             "give a folder name for -o")
        if not segmenting and self.out.is_dir():
            raise UsageError(f"{self.out} is a folder", "give a file name ending in .parquet for -o")
        if not self.out.parent.is_dir():
            raise UsageError(f"cannot write {self.out}: the folder {self.out.parent} does not exist")
        self.index, self.parts = ((self.out / "index.parquet", self.out / ".parts") if segmenting else
                                  (self.out, self.out.with_name(self.out.name + ".parts")))

    def previous(self) -> list:
        """Tables of earlier runs, oldest first: the merged output, then the parts after it."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        parts = sorted(self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []
        self.next_part = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
        tables = []
        for f in ([self.index] if self.index.is_file() else []) + parts:
            try:
                tables.append(pq.read_table(f))
            except (pa.ArrowException, OSError):  # unreadable (not ours, damaged): its items are computed again
                pass
        return tables

    def write_part(self, table) -> Path:
        import pyarrow.parquet as pq
        self.parts.mkdir(parents=True, exist_ok=True)
        target, self.next_part = self.parts / f"part-{self.next_part:05d}.parquet", self.next_part + 1
        _atomic(lambda tmp: pq.write_table(table, tmp), target)
        return target

    def merge(self, inputs: Inputs, tables: list) -> tuple:
        """The newest row per input item, in input order, plus the carried columns."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        extra = inputs.extra if inputs.extra is not None else pa.table({})
        table = pa.concat_tables(tables, promote_options="permissive")
        table = table.drop_columns([c for c in extra.column_names if c in table.column_names])  # from an old OUT
        last = {item: i for i, item in enumerate(table.column("item").to_pylist())}
        merged = table.take(pa.array([last[i] for i in inputs.items], pa.int64()))
        for name in extra.column_names:  # one named like a result column (ok, embedding...) gets input_ before it
            merged = merged.append_column(f"input_{name}" if name in merged.column_names else name, extra.column(name))
        _atomic(lambda tmp: pq.write_table(merged, tmp), self.index)
        shutil.rmtree(self.parts, ignore_errors=True)
        return merged


def _atomic(write, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def to_table(rows: list[dict]):
    """Rows -> Arrow: 1-D arrays become lists of their dtype; a column a row lacks (a failed item has no embedding) is null."""
    import pyarrow as pa
    fixed = {"item": pa.string(), "ok": pa.bool_(), "error": pa.string(), "seconds": pa.float64(),
             "bundle_sha256": pa.string(), "finished_at": pa.timestamp("ms", tz="UTC")}
    names = list(BASE) + sorted({k for r in rows for k in r} - set(BASE))
    columns: dict = {}
    for name in names:
        values = [r.get(name) for r in rows]
        sample = next((v for v in values if v is not None), None)
        kind = fixed.get(name)
        if kind is None and isinstance(sample, np.ndarray) and sample.ndim == 1:
            kind = pa.list_(pa.from_numpy_dtype(sample.dtype))
        elif isinstance(sample, np.ndarray):
            values = [v if v is None else v.tolist() for v in values]
        columns[name] = pa.array(values, type=kind)
    return pa.table(columns)


def done_items(tables: list, sha256: str) -> set:
    """Items whose newest earlier row is ok and came from this very bundle."""
    newest: dict = {}
    for t in (t for t in tables if {"item", "ok", "bundle_sha256"} <= set(t.column_names)):
        for item, ok, sha in zip(*(t.column(c).to_pylist() for c in ("item", "ok", "bundle_sha256"))):
            newest[item] = bool(ok) and sha == sha256
    return {i for i, ok in newest.items() if ok}


# -- the job ---------------------------------------------------------------------------
def run_batch(bundle, inputs, out, *, ray: bool = False, workers: int | None = None, threads: int | None = None,
              chunk_size: int = 64, batch_size: int | None = None, device: str = "auto", backend: str = "auto",
              overwrite: bool = False, max_chunks: int | None = None, ray_address: str | None = None,
              on_chunk=None) -> dict:
    """`bundle` over `inputs` into `out` (see the module docstring); max_chunks stops after that many chunks,
    unmerged, as an interrupted job would; on_chunk(done, total) reports progress. Returns the counts."""
    from .kinds import get_kind
    from .manifest import stored_hash
    from .runtime.predictor import open_bundle
    path, manifest = open_bundle(bundle)  # hashes checked once here, before any worker starts
    kind = get_kind(manifest.kind)
    suffixes, series = _listing(kind)
    segmenting = kind.batch_writes_files
    data = read_inputs(inputs, suffixes, series)
    bad = [f"{n}={v!r}" for n, v in (("workers", workers), ("threads", threads), ("chunk_size", chunk_size),
                                     ("batch_size", batch_size)) if v is not None and (not isinstance(v, int) or v < 1)]
    if bad:
        raise UsageError(f"{', '.join(bad)}: must be positive integers")
    if not ray:
        workers, threads = plan_local(workers, threads)
    store = Store(out, segmenting)
    if overwrite:  # earlier results are not resumed from
        shutil.rmtree(store.parts, ignore_errors=True)
        store.index.unlink(missing_ok=True)
    if segmenting:
        store.out.mkdir(parents=True, exist_ok=True)
        data.outputs = label_map_names(data.items)
    spec = WorkerSpec(str(path.resolve()), stored_hash(path), device, backend, threads or 1,
                      batch_size=batch_size or (2 if segmenting else 8), out_dir=str(store.out) if segmenting else None)
    done = done_items(store.previous(), spec.sha256)
    todo = list(dict.fromkeys(i for i in data.items if i not in done))  # a path listed twice runs once
    chunks = [[(i, data.outputs.get(i)) for i in todo[k:k + chunk_size]] for k in range(0, len(todo), chunk_size)]
    complete, chunks = max_chunks is None or max_chunks >= len(chunks), chunks[:max_chunks]
    counts = {"computed": 0, "failed": 0}

    def on_rows(table):  # one finished chunk, as an Arrow table of rows
        store.write_part(table)
        counts["computed"] += table.num_rows
        counts["failed"] += table.num_rows - sum(table.column("ok").to_pylist())
        if on_chunk:
            on_chunk(counts["computed"], len(todo))

    if chunks and ray:
        from .batch_ray import run_ray
        run_ray(spec, chunks, workers, threads, on_rows, address=ray_address)
    elif chunks:
        run_local(spec, chunks, workers, on_rows)
    result = {"items": len(data.items), "skipped": len(set(data.items) & done), **counts, "complete": complete,
              "output": str(store.index), "bundle_sha256": spec.sha256}
    if complete:
        result["ok"] = sum(store.merge(data, store.previous()).column("ok").to_pylist())
    return result


def _listing(kind) -> tuple:
    """(suffixes, folders are items?) a folder is listed with: the kind declares them."""
    if not kind.batch_suffixes:
        raise UsageError(f"omedge batch runs image, video and volume bundles, not {kind.name} bundles",
                         "use the Python API (omedge.load) for sequence and text-generation bundles")
    return tuple(sorted(kind.batch_suffixes)), kind.batch_folders_are_items


def plan_local(workers: int | None, threads: int | None) -> tuple[int, int]:
    """(workers, threads each) with workers x threads <= the cores this process may use."""
    return split_cores(cores(), workers, threads, "cores here", "(each worker pins its own threads)")


def split_cores(n: int, workers: int | None, threads: int | None, what: str, why: str = "") -> tuple[int, int]:
    """Fill in whichever of workers / threads is missing so that workers x threads <= n."""
    workers = workers or max(1, n // (threads or 1))
    threads = threads or max(1, n // workers)
    if workers * threads > n:
        raise UsageError(f"{workers} workers x {threads} threads is more than the {n} {what}",
                         f"lower --workers or --threads {why}".rstrip())
    return workers, threads
