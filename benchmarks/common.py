"""What every benchmark script shares: its usual arguments (runs, time per variant, threads,
precisions, a JSON copy of the rows)."""
import argparse


def bench_arguments(runs: int = 30, seconds: float = 10, precisions: str = "fp32,bf16,int8",
                    description: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--runs", type=int, default=runs, help="timed runs per variant (at least)")
    ap.add_argument("--seconds", type=float, default=seconds, help="and at least this long per variant")
    ap.add_argument("--threads", type=int, default=0, help="0: the backend's choice")
    ap.add_argument("--precisions", default=precisions)
    ap.add_argument("--json", help="also write the rows here")
    return ap
