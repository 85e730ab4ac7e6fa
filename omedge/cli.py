"""The `omedge` command: parse, call the Python API, print. Errors are printed without
a traceback (unless --debug) and exit with the error's own code."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import OmedgeError, UsageError

# Results to stdout, progress and errors to stderr. Piped output gets a wide, unwrapped
# layout so logs keep whole lines.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160, soft_wrap=True)
out = Console(width=None if sys.stdout.isatty() else 160)


def _library_output_to_stderr():
    """Quantizers print progress bars to stdout; keep stdout for results (--json)."""
    return contextlib.redirect_stdout(sys.stderr)


def _table(title, columns, rows):
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t


def cmd_models(args):
    from .models import all_specs
    from .models.pulse import SUMMARIES
    models = [s.summary() for s in all_specs().values()] + SUMMARIES
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    out.print(_table("omedge models", ["id", "task", "variants", "licence", "title"],
                     [(m["id"], m["task"], ", ".join(m["variants"]), m["licence"], m["title"]) for m in models]))
    return 0


def cmd_devices(args):
    from .devices import inventory
    inv = inventory()
    if args.json:
        print(json.dumps(inv, indent=2, default=str))
        return 0
    cpu = inv["cpu"]
    out.print(f"[bold]CPU[/bold]: {cpu['model']} ({cpu.get('vendor', '')}), {cpu.get('physical_cores')} physical / "
              f"{cpu['logical_cores']} logical cores, {cpu['usable_cores']} usable; "
              f"ISA: {', '.join(cpu['isa']) or 'baseline'}")
    if inv["nvidia_gpus"]:
        for g in inv["nvidia_gpus"]:
            out.print(f"[bold]NVIDIA GPU {g['index']}[/bold]: {g['name']}, {g['memory_mb']} MiB, driver {g['driver']}")
    else:
        out.print("[bold]NVIDIA GPU[/bold]: none found (no nvidia-ml-py / nvidia-smi answer)")
    intel = [d for d in inv["openvino_devices"] if d["name"] != "CPU"]
    out.print("[bold]Intel GPU/NPU[/bold]: " + (", ".join(f"{d['name']} ({d['full_name']})" for d in intel)
                                              or "none found by OpenVINO"))
    rows = []
    for name, p in inv["backends"].items():
        if not p["installed"]:
            rows.append((name, "-", "-", "no", f"{p['reason']}; {p['hint']}"))
            continue
        for dev, reason in p["devices"].items():
            rows.append((name, p["version"].split("-")[0], dev, "yes" if reason is None else "no", reason or ""))
    out.print(_table("backends x devices", ["backend", "version", "device", "can run", "why not / what to install"],
                     rows))
    for name, p in inv["backends"].items():
        if p.get("warning"):
            out.print(f"[bold yellow]warning[/bold yellow] ({name}): {p['warning']}")
    return 0


def _precision(args) -> str:
    chosen = [p for p, flag in (("fp16", args.fp16), ("bf16", args.bf16), ("int8", args.int8),
                                ("int8-dynamic", args.int8_dynamic), ("int4", args.int4)) if flag]
    if len(chosen) > 1:
        raise UsageError(f"choose one precision, got {', '.join(chosen)}")
    return chosen[0] if chosen else "fp32"


LLM_QUANT = {"fp32": "F16", "fp16": "F16", "int8": "Q8_0", "int4": "Q4_K_M"}


def cmd_export_llm(args):
    from .exporters.llm import export_llm
    precision = _precision(args)
    if args.quant and precision != "fp32":
        raise UsageError("give either --quant or one of --int4/--int8/--fp16")
    if precision not in LLM_QUANT:
        raise UsageError(f"--{precision} does not apply to GGUF", "use --int4 (Q4_K_M), --int8 (Q8_0), --fp16 "
                         "or --quant Q4_0|Q5_K_M|Q6_K|Q8_0")
    quant = args.quant or LLM_QUANT[precision]
    with console.status("exporting") as status, _library_output_to_stderr():
        def log(msg):
            status.update(msg)
            console.log(msg)
        path = export_llm(args.model, args.weights, out=args.output, quant=quant, keep_f16=args.keep_f16,
                          overwrite=args.overwrite, force=args.force, threads=args.threads, log=log)
    from .bundle import read_manifest
    m = read_manifest(path)
    art = m["artifacts"][0]
    if args.json:
        print(json.dumps({"bundle": str(path), "artifacts": m["artifacts"]}, indent=2))
        return 0
    par = art["parity"]
    rows = [(k, f"{v['argmax_agreement']:.4f}", v["positions"], f"{v['logit_max_abs']:.3g}")
            for k, v in par.items() if k.startswith("vs_")]
    out.print(_table(f"{path} ({art['precision']}, {m['files'][art['entry']]['bytes'] / 1e6:.1f} MB) - "
                     f"gate: {par['gate']['metric']} >= {par['gate']['min']}",
                     ["reference", "argmax agreement", "positions", "max abs logit error"], rows))
    tok = par["tokenizer"]
    out.print(f"tokenizer round trip: {tok['exact']}/{tok['texts']} texts identical to transformers")
    return 0


def cmd_export(args):
    from .models.pulse import LLM_IDS
    if args.model in LLM_IDS:
        return cmd_export_llm(args)
    if args.int4 or args.quant or args.keep_f16:
        raise UsageError("--int4 / --quant / --keep-f16 are for GGUF (PULSE) exports")
    from .exporters import export
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    with console.status("exporting") as status, _library_output_to_stderr():
        def log(msg):
            status.update(msg)
            console.log(msg)
        path = export(args.model, args.weights, out=args.output, variant=args.variant,
                      formats=[f.strip() for f in args.format.split(",")], precision=_precision(args),
                      calib=args.calib, calib_size=args.calib_size, verify_data=args.verify_data,
                      random_weights=args.random_weights, seed=args.seed,
                      trust_checkpoint=args.trust_checkpoint, labels=labels, frames=args.frames,
                      overwrite=args.overwrite,
                      force=args.force, log=log)
    from .bundle import read_manifest
    m = read_manifest(path)
    if args.json:
        print(json.dumps({"bundle": str(path), "artifacts": m["artifacts"], "weights": m["weights"]}, indent=2))
        return 0
    if m["weights"]["source"] == "random":
        out.print("[bold red]RANDOM WEIGHTS[/bold red]: this bundle tests the pipeline; it is not a medical model")
    rows = []
    for a in m["artifacts"]:
        for name, met in a["parity"]["outputs"].items():
            rows.append((a["name"], name, f"{met['cosine_min']:.6f}", f"{met['max_abs']:.3g}",
                         met.get("top1_agreement", "-"), a["parity"]["gates"]["cosine_min"],
                         "pass" if a["parity"]["passed"] else "FAIL (forced)"))
    out.print(_table(f"{path} - parity vs torch fp32 ({m['verification']['samples']} inputs)",
                     ["artifact", "output", "cosine min", "max abs", "top-1", "gate", "result"], rows))
    return 0


def cmd_predict_llm(p, args):
    results = []
    for prompt in args.inputs:
        results.append({"prompt": prompt, "answer": p.generate(prompt, max_tokens=args.max_tokens, mode=args.mode)})
    if args.json:
        print(json.dumps({"runtime": p.describe(), "results": results}, ensure_ascii=False, indent=2))
    else:
        for r in results:
            out.print(f"[bold]{r['prompt']}[/bold]\n{r['answer']}\n")
    return 0


def cmd_predict_stream(p, args):
    """Video files / frame folders: one result per clip window (or frame), with times."""
    report = []
    for src in args.inputs:
        windows = []
        for r in p.stream(src, stride=args.stride):
            w = {k: v for k, v in r.items() if k != "outputs"}
            w.update({k: v.tolist() for k, v in r["outputs"].items()})
            windows.append(w)
        report.append({"input": src, "windows": windows, "stats": p.last_stream_stats})
    if args.json:
        print(json.dumps({"runtime": p.describe(), "results": report}, indent=None))
        return 0
    for item in report:
        rows = [(w["index"], f"{w['t_start']:.2f}-{w['t_end']:.2f}", w.get("label", "-"),
                 f"{w['probability']:.3f}" if "probability" in w else "-", f"{w['latency_ms']:.0f}")
                for w in item["windows"]]
        out.print(_table(f"{item['input']}: {item['stats']['results']} results, {item['stats']['dropped']} dropped, "
                         f"{item['stats']['corrupt']} corrupt frames", ["window", "time s", "label", "probability",
                                                                       "latency ms"], rows))
    return 0


def cmd_predict_volume(p, args):
    """CT/MR volumes -> NIfTI label maps on the input grid, with per-class volumes."""
    import time

    from rich.progress import Progress

    from .io.volume import write_labels
    from .runtime.volume import class_volumes
    if args.output and len(args.inputs) > 1:
        raise UsageError("-o names one label map; give one input at a time, or omit -o to write "
                         "<input>_seg.nii.gz next to each input")
    results = []
    for src in args.inputs:
        name = Path(src).name.removesuffix(".gz").removesuffix(".nii")
        target = Path(args.output) if args.output else Path(src).parent / f"{name}_seg.nii.gz"
        if target.exists() and not args.overwrite:
            raise UsageError(f"{target} already exists", "pass --overwrite to replace it")
        t0 = time.perf_counter()
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"segmenting {Path(src).name}", total=None)
            labels, vol = p.segment(src, tta=args.tta, batch_size=args.batch_size or 2,
                                    progress=lambda done, total: bar.update(task, completed=done, total=total))
        write_labels(labels, vol, target, overwrite=args.overwrite)
        results.append({"input": src, "output": str(target), "shape": list(vol.data.shape),
                        "spacing_mm": [round(float(v), 4) for v in vol.spacing], "seconds": time.perf_counter() - t0,
                        "volumes_ml": class_volumes(labels, vol, p.labels)})
    if args.json:
        print(json.dumps({"runtime": p.describe(), "results": results}, indent=2))
        return 0
    for r in results:
        out.print(f"{r['input']} -> {r['output']} ({r['seconds']:.1f} s)")
        rows = sorted(r["volumes_ml"].items(), key=lambda kv: -kv[1])
        out.print(_table("structures found", ["label", "volume ml"], rows))
    return 0


def cmd_predict(args):
    from .io.video import VIDEO_SUFFIXES
    from .runtime import load
    p = load(args.bundle, device=args.device, backend=args.backend, threads=args.threads)
    if hasattr(p, "generate"):
        return cmd_predict_llm(p, args)
    if p.manifest["preprocess"].get("kind") == "volume":
        return cmd_predict_volume(p, args)
    if p.manifest["preprocess"].get("kind") == "video" or any(
            Path(i).suffix.lower() in VIDEO_SUFFIXES or Path(i).is_dir() for i in args.inputs):
        return cmd_predict_stream(p, args)
    outputs = p.predict(args.inputs, batch_size=args.batch_size or 8, return_dict=True)
    results = []
    for i, name in enumerate(args.inputs):
        r = {"input": name}
        for k, v in outputs.items():
            r[k] = v[i] if k == "labels" else v[i].tolist()
        results.append(r)
    info = p.describe()
    if args.json:
        print(json.dumps({"runtime": info, "results": results}, indent=None if len(results) > 4 else 2))
        return 0
    if p.manifest["weights"]["source"] == "random":
        console.print("[bold red]RANDOM WEIGHTS[/bold red]: outputs are meaningless, for pipeline tests only")
    console.print(f"{info['backend']} on {info['device']} ({info['artifact']}, precision {info['precision']})")
    if "labels" in outputs:
        rows = [(r["input"], r["labels"], f"{max(r['probabilities']):.3f}") for r in results]
        out.print(_table("predictions", ["input", "label", "probability"], rows))
    else:
        rows = []
        for r in results:
            e = r["embedding"]
            rows.append((r["input"], len(e), f"{sum(x * x for x in e) ** 0.5:.4f}",
                         ", ".join(f"{x:.4f}" for x in e[:4]) + ", ..."))
        out.print(_table("embeddings", ["input", "dim", "L2 norm", "values"], rows))
    return 0


def cmd_verify(args):
    from .verify import verify
    report = verify(args.bundle, device=args.device)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        out.print(f"hashes: {report['hashes']} ({report['files']} files)")
        if report["runs"] and "argmax_agreement" in report["runs"][0]:
            rows = [(r["artifact"], r["backend"], r["device"], f"{r['argmax_agreement']:.4f}", r["gate"],
                     f"{r['top8_logit_max_abs']:.3g}", r["result"]) for r in report["runs"]]
            cols = ["artifact", "backend", "device", "argmax agreement", "gate", "top-8 logit max abs", "result"]
        else:
            rows = [(r["artifact"], r["backend"], r["device"], r.get("inference_precision") or "-",
                     r.get("cosine_min", "-"), r.get("top1_agreement", r.get("dice_min", "-")), r["result"])
                    for r in report["runs"]]
            cols = ["artifact", "backend", "device", "exec precision", "cosine min", "top-1 / Dice", "result"]
        out.print(_table("parity on this machine vs the stored reference", cols, rows))
        for s in report["skipped"]:
            console.print(f"[dim]skipped: {s}[/dim]")
    return 0 if report["passed"] else 5


def cmd_bench(args):
    from .bench import add_ratios, bench_bundle, bench_model, bench_volume
    target = Path(args.target)
    if args.input:
        if not target.is_dir():
            raise UsageError("--input benchmarks a segmentation bundle: give the bundle folder")
        with console.status("segmenting with each backend"), _library_output_to_stderr():
            rows = bench_volume(target, args.input, device=args.device, threads=args.threads)
        if args.json:
            print(json.dumps(rows, indent=2, default=str))
            return 0
        table = [(r.get("variant", "?"), r.get("backend", ""), *(
            [r["error"][:100], "", "", "", ""] if "error" in r else
            [f"{r['size_mb']:.1f}", f"{r['seconds']:.1f}", f"{r['voxels_per_s'] / 1e6:.3f}", f"{r['peak_rss_mb']:.0f}",
             f"{r['dice_min_vs_first']:.4f}"])) for r in rows]
        out.print(_table(f"omedge bench {target.name} on {args.input}", ["variant", "backend", "size MB", "seconds",
                         "Mvoxels/s", "peak RSS MB", "Dice min vs first"], table))
        return 0
    with console.status("benchmarking") as status, _library_output_to_stderr():
        def log(msg):
            status.update(msg)
            console.log(msg)
        modes = ("latency", "throughput") if args.throughput else ("latency",)
        if target.is_dir():
            rows = bench_bundle(target, device=args.device, batch=args.batch, runs=args.runs,
                                seconds=args.seconds, threads=args.threads, modes=modes)
        else:
            rows = bench_model(args.target, weights=args.weights, variant=args.variant, calib=args.calib,
                               batch=args.batch, runs=args.runs, seconds=args.seconds, threads=args.threads,
                               modes=modes, log=log)
    rows = add_ratios(rows)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    out.print(bench_table(rows, args.batch))
    return 0


def cmd_chat(args):
    """Interactive chat: tokens stream as they come; Ctrl-C stops an answer, Ctrl-C or
    Ctrl-D at the prompt leaves; history is trimmed to the context window."""
    from .runtime import load
    p = load(args.bundle, device=args.device, threads=args.threads)
    if not hasattr(p, "chat"):
        raise UsageError(f"{args.bundle} is not an LLM bundle", "chat works with `omedge export pulse` bundles")
    info = p.describe()
    console.print(f"{info['model']} ({info['precision']}) on llama.cpp/{info['device']}, context {info['n_ctx']} "
                  "tokens. Ctrl-C stops an answer; Ctrl-D or Ctrl-C here quits.")
    history = []
    while True:
        try:
            question = input("User: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not question:
            continue
        if question in ("/clear", "/reset"):
            history = []
            continue
        history.append({"role": "user", "content": question})
        answer = ""
        print("Helper: ", end="", flush=True)
        try:
            for piece in p.chat(history, max_tokens=args.max_tokens, stream=True, mode=args.mode):
                answer += piece
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        except OmedgeError as e:
            history.pop()
            print()
            console.print(f"[bold red]error:[/bold red] {e.message}")
            continue
        print()
        history.append({"role": "assistant", "content": answer.strip()})


def bench_table(rows, batch):
    table = []
    for r in rows:
        if "error" in r:
            table.append((r.get("variant", "?"), r.get("backend", ""), "", "", "", "", "", "", r["error"][:110]))
            continue
        par = r.get("parity")
        if par is None:
            ptxt = "reference"
        else:
            cos = min(m["cosine_min"] for m in par["outputs"].values())
            ptxt = f"cos {cos:.5f}" + ("" if par["passed"] else " FAIL")
        rt = r["runtime"]
        table.append((r["variant"], f"{rt['backend']}/{rt['device']}" +
                      (f" ({rt['inference_precision']}, {rt['streams']} stream{'s' * (rt['streams'] > 1)})"
                       if rt.get("inference_precision") else ""),
                      f"{r['size_mb']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                      f"{r['throughput']:.2f}",
                      f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else "-",
                      f"{r['peak_rss_mb']:.0f}", ptxt))
    return _table(f"omedge bench (batch {batch})", ["variant", "runs on", "size MB", "p50 ms", "p99 ms",
                  "items/s", "vs torch", "peak RSS MB", "parity"], table)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="omedge", description="Export OpenMEDLab models to verified offline bundles "
                                 "and run them on the hardware at hand.")
    ap.add_argument("--version", action="version", version=f"omedge {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help="list model ids, variants, tasks, licences")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("devices", help="hardware found, usable backends, and why not")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_devices)

    s = sub.add_parser("export", help="checkpoint -> verified bundle")
    s.add_argument("model", help="model id (see `omedge models`)")
    s.add_argument("--weights", help="official checkpoint (.pth/.pt/.bin/.safetensors)")
    s.add_argument("--random-weights", action="store_true", help="seeded random weights (pipeline demo only)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--variant", help="model size; detected from the checkpoint when omitted")
    s.add_argument("--format", default="onnx", help="comma list: onnx,openvino")
    prec = s.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true")
    prec.add_argument("--bf16", action="store_true", help="OpenVINO bf16 execution")
    prec.add_argument("--int8", action="store_true", help="static INT8; needs --calib")
    prec.add_argument("--int8-dynamic", action="store_true", help="INT8 weights, no calibration")
    prec.add_argument("--int4", action="store_true", help="GGUF Q4_K_M (PULSE)")
    s.add_argument("--quant", help="GGUF type for PULSE: Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q8_0, F16")
    s.add_argument("--keep-f16", action="store_true", help="keep the F16 GGUF intermediate in the bundle")
    s.add_argument("--threads", type=int)
    s.add_argument("--calib", help="folder of calibration images, or 'synthetic'")
    s.add_argument("--calib-size", type=int, default=64)
    s.add_argument("--verify-data", help="folder of images for the parity check")
    s.add_argument("--labels", help="comma list of class names for a classifier head")
    s.add_argument("--frames", type=int, help="video models: frames per clip (Endo-FM default 8)")
    s.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling (only for trusted files)")
    s.add_argument("-o", "--output", help="bundle folder (.omedge)")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--force", action="store_true", help="keep a bundle that fails parity (marked in the manifest)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("predict", help="run a bundle on images")
    s.add_argument("bundle")
    s.add_argument("inputs", nargs="+")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "gpu", "npu"])
    s.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "openvino"])
    s.add_argument("--threads", type=int)
    s.add_argument("--batch-size", type=int, help="images per run (default 8; volumes: windows per run, 2)")
    s.add_argument("--stride", type=int, help="videos: a result every N sampled frames (default: one clip)")
    s.add_argument("-o", "--output", help="volumes: the label map to write (.nii.gz)")
    s.add_argument("--overwrite", action="store_true", help="volumes: replace an existing label map")
    s.add_argument("--tta", action="store_true", help="volumes: 8-way mirroring (slower, as nnU-Net)")
    s.add_argument("--max-tokens", type=int, default=256, help="LLM bundles: answer length limit")
    s.add_argument("--mode", choices=["qa", "consultation"], help="LLM bundles: PULSE's question prefix")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("chat", help="interactive chat with an LLM bundle (streaming)")
    s.add_argument("bundle")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--threads", type=int)
    s.add_argument("--max-tokens", type=int, default=512)
    s.add_argument("--mode", choices=["qa", "consultation"])
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("bench", help="backend x precision table (bundle, or model id to export and compare)")
    s.add_argument("target", help="a bundle folder or a model id")
    s.add_argument("--weights")
    s.add_argument("--variant")
    s.add_argument("--calib")
    s.add_argument("--device", default="cpu")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--runs", type=int, default=20)
    s.add_argument("--seconds", type=float, default=5.0, help="minimum timing time per variant")
    s.add_argument("--threads", type=int)
    s.add_argument("--input", help="segmentation bundles: time whole-volume inference on this NIfTI / DICOM")
    s.add_argument("--throughput", action="store_true",
                   help="also measure with several requests in flight (OpenVINO streams)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("verify", help="re-check hashes and parity on this machine")
    s.add_argument("bundle")
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OmedgeError as e:
        if args.debug:
            console.print_exception()
        console.print(f"[bold red]error:[/bold red] {e.message}")
        if e.hint:
            console.print(f"  -> {e.hint}")
        return e.exit_code
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/bold red]: nothing was left half-written")
        return 130


if __name__ == "__main__":
    sys.exit(main())
