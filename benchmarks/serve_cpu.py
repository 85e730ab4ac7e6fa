"""`omedge serve` on this CPU, in one run, with seeded random weights (none can be
downloaded here):

1. a ViT-B/16 INT8 bundle (BROW layout) served over OIP: requests/s and p50/p99 latency
   at 1, 4 and 16 concurrent clients, each sending one 256 px PNG tile as raw BYTES (the
   server decodes, preprocesses and batches dynamically), vs the in-process
   `p.predict` throughput on the same files (target: >= 90% at 16 clients);
2. a PULSE-shaped GGUF bundle behind /v1/chat/completions: streamed tokens/s (after the
   first token) and time to first token, vs in-process `p.chat(stream=True)`.

The server runs in its own process (the load generator does not share its GIL).

    python benchmarks/serve_cpu.py [--variant B|tiny] [--llm-size 300M|tiny] [--seconds 10] [--json OUT]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from omedge.serve.oip import encode_bytes
from tests.conftest import official_state_dict, write_tiles

LLM_SIZES = {"300M": {"hidden": 1024, "layers": 16, "heads": 16, "vocab": 100352}, "tiny": {}}
SERVER = ("import json, sys; from omedge.serve.app import run; from omedge.serve.config import ServeConfig; "
          "a = json.loads(sys.argv[1]); run(a.pop('bundles'), ServeConfig(**a))")
QUESTION = [{"role": "user", "content": "患者男，65岁，反复胸闷气短两周，活动后加重，怎么办？"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`omedge.serve.app.run` in a child process, until the context ends."""

    def __init__(self, bundles, **config):
        self.port = free_port()
        self.args = {"bundles": [str(b) for b in bundles], "port": self.port, **config}
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(self.args)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not become ready")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(60)


def make_vit(work: Path, variant: str) -> tuple[Path, list[Path]]:
    import torch

    import omedge
    tiles = write_tiles(work / "tiles", 64, size=256, seed=1)
    bundle = work / f"brow-{variant}-int8.omedge"
    if not bundle.exists():
        torch.save(official_state_dict("brow", variant=variant), work / "brow.pth")
        omedge.export("brow", work / "brow.pth", variant=variant, formats=["onnx", "openvino"], precision="int8",
                      calib=tiles[0].parent, out=bundle)
    return bundle, tiles


def in_process_images(bundle: Path, files: list[Path], seconds: float, batch: int) -> dict:
    import omedge
    p = omedge.load(bundle)
    names = [str(f) for f in files]
    p.predict(names[:batch], batch_size=batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        p.predict(names, batch_size=batch)
        n += len(names)
    return {"images_per_s": n / (time.perf_counter() - t0), "runtime": p.describe()}


def load(url: str, name: str, payloads: list, clients: int, seconds: float, headers=None) -> dict:
    """`clients` threads, each sending one request at a time for `seconds`."""
    latencies, errors, stop = [], [], time.perf_counter() + seconds

    def worker(k):
        with httpx.Client(timeout=120) as c:
            i = k
            while time.perf_counter() < stop:
                body, hdr = payloads[i % len(payloads)]
                t = time.perf_counter()
                r = c.post(f"{url}/v2/models/{name}/infer", content=body, headers=hdr)
                (latencies if r.status_code == 200 else errors).append(time.perf_counter() - t)
                i += clients
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    return {"clients": clients, "requests_per_s": len(lat) / wall, "errors": len(errors),
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None}


def png_request(path: Path) -> tuple[bytes, dict]:
    blob = encode_bytes([path.read_bytes()])
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(blob)}}]}).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head))}


def images(work: Path, args) -> dict:
    bundle, tiles = make_vit(work, args.variant)
    base = in_process_images(bundle, tiles, args.seconds, args.max_batch)
    payloads = [png_request(t) for t in tiles]
    rows = []
    with Server([f"vit={bundle}"], max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, max_queue=256) as s:
        load(s.url, "vit", payloads, 4, 2)   # warm-up
        for clients in (1, 4, 16):
            r = load(s.url, "vit", payloads, clients, args.seconds)
            r["vs_in_process"] = r["requests_per_s"] / base["images_per_s"]
            rows.append(r)
            print(f"  {clients:2d} clients: {r['requests_per_s']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                  f"p99 {r['p99_ms']:7.1f} ms  {r['vs_in_process']:6.1%} of in-process  ({r['errors']} errors)")
    print(f"  in-process predict: {base['images_per_s']:.1f} images/s on {base['runtime']['backend']}")
    return {"in_process": base, "served": rows}


def make_llm(work: Path, size: str) -> Path:
    from omedge.exporters.llm import export_llm
    from tests.pulse_folders import tiny_bloom
    bundle = work / f"pulse-{size}-q4.omedge"
    if not bundle.exists():
        folder = tiny_bloom(work / f"bloom-{size}", shard="500MB", **LLM_SIZES[size])
        export_llm("pulse", folder, quant="Q4_K_M", out=bundle)
    return bundle


def timed_stream(pieces) -> dict:
    t0, first, n = time.perf_counter(), None, 0
    for _ in pieces:
        n += 1
        first = first or time.perf_counter()
    end = time.perf_counter()
    return {"tokens": n, "ttft_s": (first or end) - t0,
            "tokens_per_s": (n - 1) / (end - first) if first and n > 1 and end > first else None}


def llm(work: Path, args) -> dict:
    import openai

    import omedge
    bundle = make_llm(work, args.llm_size)
    p = omedge.load(bundle)
    local = timed_stream(p.chat(QUESTION, max_tokens=args.new_tokens, stream=True, temperature=0))
    del p
    with Server([f"pulse={bundle}"]) as s:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", timeout=300, max_retries=0)
        stream = c.chat.completions.create(model="pulse", messages=QUESTION, max_tokens=args.new_tokens,
                                           temperature=0, stream=True)
        served = timed_stream(ch for ch in stream if ch.choices and ch.choices[0].delta.content)
    for what, r in (("in-process", local), ("served", served)):
        rate = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else "-"
        print(f"  {what:10s}: {r['tokens']} tokens, {rate} tokens/s, first token after {r['ttft_s'] * 1000:.0f} ms")
    return {"in_process": local, "served": served}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="B", help="BROW variant (B is ViT-B/16; tiny for a smoke run)")
    ap.add_argument("--llm-size", default="300M", choices=list(LLM_SIZES))
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-delay-ms", type=float, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--workdir")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="servebench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {os.cpu_count()} logical cores; work folder {work}")
    print(f"[1] ViT ({args.variant}) INT8 over OIP, raw PNG tiles, max_batch {args.max_batch}, "
          f"max_delay {args.max_delay_ms} ms")
    result = {"images": images(work, args)}
    print(f"[2] PULSE-shaped ({args.llm_size}) Q4_K_M, streamed")
    result["llm"] = llm(work, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
