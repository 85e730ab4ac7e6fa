"""What every benchmark script shares: its usual arguments (runs, time per variant, threads,
precisions, a JSON copy of the rows)."""
import argparse
import time


def bench_arguments(runs: int = 30, seconds: float = 10, precisions: str = "fp32,bf16,int8",
                    description: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--runs", type=int, default=runs, help="timed runs per variant (at least)")
    ap.add_argument("--seconds", type=float, default=seconds, help="and at least this long per variant")
    ap.add_argument("--threads", type=int, default=0, help="0: the backend's choice")
    ap.add_argument("--precisions", default=precisions)
    ap.add_argument("--json", help="also write the rows here")
    return ap


def matmul_ceiling(threads: int, sizes=(1024, 2048, 3072), trials: int = 5) -> dict:
    """Best observed dense matmul G(FL)OP/s of this machine through torch (oneDNN/MKL),
    per precision: the best of several sizes and trials, since a shared VM is noisy."""
    import torch
    torch.set_num_threads(threads)
    res = {}
    for name, make, mm in [
        ("fp32", lambda n: torch.randn(n, n), torch.matmul),
        ("bf16", lambda n: torch.randn(n, n).bfloat16(), torch.matmul),
        ("int8", lambda n: torch.randint(-128, 127, (n, n), dtype=torch.int8), torch._int_mm),
    ]:
        best = 0.0
        for n in sizes:
            a, b = make(n), make(n)
            mm(a, b)
            for _ in range(trials):
                t = time.perf_counter()
                mm(a, b)
                best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
        res[name] = best
    return res


def precision_of(variant: str, runtime: dict) -> str:
    """The matmul ceiling a row is measured against: int8 for INT8 bundles, bf16 where the
    backend ran bf16 (OpenVINO's inference precision), else fp32."""
    if "int8" in variant:
        return "int8"
    return "bf16" if runtime.get("inference_precision") == "bf16" or "bf16" in variant else "fp32"
