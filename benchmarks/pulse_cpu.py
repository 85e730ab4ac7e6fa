"""PULSE path on this CPU, in one run, with random BLOOM-shaped models (no weights can
be downloaded here):

1. decode tokens/s of the Q4_K_M bundle (llama.cpp) vs transformers fp32 eager greedy
   decoding of the same model, plus prompt-processing tokens/s, time to first token
   and file sizes, on a ~300M-parameter model;
2. peak RSS of the HF -> GGUF conversion for a ~300M and a ~1.2B model, each in its own
   process, next to the size of the largest tensor: streaming keeps memory flat.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.pulse_folders import tiny_bloom  # noqa: E402

SIZES = {"300M": dict(hidden=1024, layers=16, heads=16, vocab=100352),
         "1.2B": dict(hidden=2048, layers=20, heads=16, vocab=100352)}


def make(folder: Path, size: str) -> Path:
    if not (folder / "config.json").exists():
        tiny_bloom(folder, shard="500MB", std=0.02, **SIZES[size])
    return folder


def convert_rss(folder: Path, out: Path) -> dict:
    code = ("import sys, time; from pathlib import Path; from omedge.models.pulse import inspect_folder; "
            "from omedge.exporters.gguf import convert; t=time.time(); "
            "r = convert(inspect_folder(sys.argv[1]), Path(sys.argv[2])); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print(int(hwm) / 1024, r['largest_tensor_mb'], time.time() - t)")
    res = subprocess.run([sys.executable, "-c", code, str(folder), str(out)], capture_output=True, text=True)
    rss, largest, secs = map(float, res.stdout.split()[-3:])
    return {"peak_rss_mb": rss, "largest_tensor_mb": largest, "seconds": secs,
            "f16_gguf_mb": out.stat().st_size / 1e6}


def hf_decode(folder: Path, prompt_ids, n_new: int) -> dict:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        t = time.perf_counter()
        model(ids)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        total = time.perf_counter() - t
    n = out.shape[1] - len(prompt_ids)
    return {"decode_tok_s": (n - 1) / max(total - prefill, 1e-9), "prompt_tok_s": len(prompt_ids) / prefill,
            "ttft_s": prefill, "size_mb": sum(p.numel() * 4 for p in model.parameters()) / 1e6}


def llama_decode(gguf: Path, prompt_ids, n_new: int) -> dict:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(prompt_ids) + n_new + 8, verbose=False)
    llm.eval(prompt_ids[:8])  # warm-up
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt_ids)
    prefill = time.perf_counter() - t
    llm.reset()
    t = time.perf_counter()
    times, n = [], 0
    for tok in llm.generate(prompt_ids, temp=0, reset=True):
        times.append(time.perf_counter() - t)
        n += 1
        if n >= n_new:
            break
    ttft = times[0]
    return {"decode_tok_s": (n - 1) / (times[-1] - times[0]), "prompt_tok_s": len(prompt_ids) / prefill,
            "ttft_s": ttft, "size_mb": gguf.stat().st_size / 1e6}


def decode_table(folder: Path, work: Path, new_tokens: int) -> dict:
    from transformers import AutoTokenizer

    from omedge.exporters.llm import export_llm
    bundle = work / "bloom-300M-q4.omedge"
    if not bundle.exists():
        export_llm("pulse", folder, quant="Q4_K_M", out=bundle, log=print)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    prompt = tok("Instructions: You are Helper. User: 患者男，65岁，反复胸闷气短两周，活动后加重。请问需要做哪些检查？"
                 " The patient reports chest pain and shortness of breath on exertion.")["input_ids"]
    prompt = (prompt * 4)[:96]
    rows = {"transformers fp32 eager": hf_decode(folder, prompt, new_tokens),
            "omedge Q4_K_M (llama.cpp)": llama_decode(bundle / "model-Q4_K_M.gguf", prompt, new_tokens)}
    base = rows["transformers fp32 eager"]
    print(f"\n~300M BLOOM-shaped model, prompt {len(prompt)} tokens, {new_tokens} new tokens, greedy, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':28s} {'size MB':>9s} {'prompt tok/s':>13s} {'TTFT s':>8s} {'decode tok/s':>13s} {'vs fp32':>8s}")
    for k, r in rows.items():
        print(f"{k:28s} {r['size_mb']:9.1f} {r['prompt_tok_s']:13.1f} {r['ttft_s']:8.3f} {r['decode_tok_s']:13.1f} "
              f"{r['decode_tok_s'] / base['decode_tok_s']:7.2f}x")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="only the conversion memory measurement")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="omedge-pulse-bench-"))
    folder = make(work / "bloom-300M", "300M")
    rows = {} if args.memory_only else decode_table(folder, work, args.new_tokens)
    mem = {}
    for size in ("300M",) + (() if args.skip_1b else ("1.2B",)):
        f = make(work / f"bloom-{size}", size)
        mem[size] = convert_rss(f, work / f"conv-{size}.gguf")
        (work / f"conv-{size}.gguf").unlink()
    print("\nHF -> GGUF F16 conversion, each in its own process")
    print(f"{'model':8s} {'F16 GGUF MB':>12s} {'largest tensor MB':>18s} {'peak RSS MB':>12s} {'seconds':>8s}")
    for k, r in mem.items():
        print(f"{k:8s} {r['f16_gguf_mb']:12.0f} {r['largest_tensor_mb']:18.0f} {r['peak_rss_mb']:12.0f} "
              f"{r['seconds']:8.1f}")
    if args.json:
        json.dump({"decode": rows, "conversion": mem}, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
