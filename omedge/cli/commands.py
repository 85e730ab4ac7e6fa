"""The `omedge` command: parse, call the Python API, print. Errors are printed without
a traceback (unless --debug) and exit with the error's own code."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import OmedgeError, UsageError

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
    from ..models import all_specs
    models = [s.summary() for s in all_specs().values()]
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    out.print(_table("omedge models", ["id", "kind", "outputs", "variants", "licence", "title"],
                     [(m["id"], m["kind"], ", ".join(m["outputs"]), ", ".join(m["variants"]), m["licence"], m["title"])
                      for m in models]))
    return 0


def cmd_devices(args):
    from ..devices import inventory
    from ..runtime.plan import backend_report
    inv = {**inventory(), "backends": backend_report()}
    if args.json:
        print(json.dumps(inv, indent=2, default=str))
        return 0
    cpu = inv["cpu"]
    out.print(f"[bold]CPU[/bold]: {cpu['model']} ({cpu.get('vendor', '')}), {cpu.get('physical_cores')} physical / "
              f"{cpu['logical_cores']} logical cores, {cpu['usable_cores']} usable; "
              f"ISA: {', '.join(cpu['isa']) or 'baseline'}")
    out.print(f"[bold]INT8[/bold]: {'exact' if inv['int8']['exact'] else 'saturating'}, {inv['int8']['why']}")
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
    llama = inv["backends"].get("llama.cpp", {})
    if llama.get("installed"):
        variant = llama.get("cpu_variant")
        built = (f"runtime CPU dispatch over {', '.join(llama['cpu_dispatch'])}" if llama.get("cpu_dispatch")
                 else "one static CPU backend (no runtime dispatch: see the README's llama.cpp build)")
        out.print(f"[bold]llama.cpp CPU kernels[/bold]: {variant} ({built})")
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


def _hw(text):
    """--image-size 800x1344 -> (800, 1344)."""
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--image-size {text!r}: give HxW, e.g. 800x1344") from None
    return (h, w)


def cmd_export(args):
    from ..exporters import export
    from ..manifest import read_manifest
    from ..models import get_spec
    precision = _precision(args)
    spec = get_spec(args.model)
    if not spec.exporter and (args.int4 or args.quant or args.keep_f16):
        raise UsageError("--int4 / --quant / --keep-f16 are for GGUF (PULSE) exports")
    if spec.exporter and args.quant and precision != "fp32":
        raise UsageError("give either --quant or one of --int4/--int8/--fp16")
    options = {"labels": [s.strip() for s in args.labels.split(",")] if args.labels else None,
               "frames": args.frames, "crop": args.crop, "sam": getattr(args, "sam", None),
               "text_encoder": args.text_encoder, "with_text_encoder": args.with_text_encoder or None,
               "classes": [c.strip() for c in args.classes.split(",")] if args.classes else None,
               "image_size": _hw(args.image_size), "prompt": args.prompt}
    if spec.exporter:
        options = {"quant": args.quant, "keep_f16": args.keep_f16 or None, "threads": args.threads}
    with console.status("exporting") as status, _library_output_to_stderr():
        def log(msg):
            status.update(msg)
            console.log(msg)
        path = export(args.model, args.weights, out=args.output, variant=args.variant,
                      formats=[f.strip() for f in args.format.split(",")], precision=precision,
                      calib=args.calib, calib_size=args.calib_size, verify_data=args.verify_data,
                      random_weights=args.random_weights, seed=args.seed, trust_checkpoint=args.trust_checkpoint,
                      overwrite=args.overwrite, force=args.force, record_names=getattr(args, "record_names", False),
                      log=log, **options)
    m = read_manifest(path)
    if args.json:
        print(json.dumps({"bundle": str(path), "artifacts": m.to_dict()["artifacts"], "weights": m.weights}, indent=2))
        return 0
    if m.weights["source"] == "random":
        out.print("[bold red]RANDOM WEIGHTS[/bold red]: this bundle tests the pipeline; it is not a medical model")
    out.print(parity_table(path, m))
    return 0


def parity_table(path, m):
    """One row per artifact x metric, whatever the kind measured."""
    rows = []
    for a in m.artifacts:
        par = a.parity
        for name, met in par.get("outputs", {}).items():
            figures = ", ".join(f"{k} {v:.6g}" for k, v in met.items() if isinstance(v, (int, float)))
            rows.append((a.name, name, figures, "pass" if par.get("passed") else "FAIL (forced)"))
        for key, met in par.items():
            if key.startswith("vs_"):
                rows.append((a.name, key, (f"argmax agreement {met['argmax_agreement']:.4f}, positions "
                              f"{met['positions']}, max abs logit error {met['logit_max_abs']:.3g}"),
                             "pass" if par.get("passed") else "FAIL (forced)"))
        if "volume_dice" in par:
            rows.append((a.name, "whole volume", f"Dice min {par['volume_dice']['min']:.4f}", ""))
        if "peak_rss_mb" in par:
            rss = f"{par['peak_rss_mb']:.0f} MB (process, to the end of verification)"
            rows.append((a.name, "export peak RSS", rss, ""))
        if "tokenizer" in par:
            tok = par["tokenizer"]
            rows.append((a.name, "tokenizer round trip", (f"{tok['exact']}/{tok['texts']} texts identical to "
                         "transformers"), "pass" if tok["passed"] else "FAIL"))
        gate = par.get("gate") or par.get("gates")
        rows.append((a.name, "gate", json.dumps(gate), ""))
    return _table(f"{path} - parity vs torch fp32 ({m.verification.get('samples', '-')} inputs)",
                  ["artifact", "output", "figures", "result"], rows)


class UI:
    """What a kind's CLI handler prints with: results to stdout, the rest to stderr."""
    out, err = out, console

    def table(self, title, columns, rows):
        out.print(_table(title, columns, rows))

    def runtime_line(self, p):
        if p.manifest.weights["source"] == "random":
            console.print("[bold red]RANDOM WEIGHTS[/bold red]: outputs are meaningless, for pipeline tests only")
        info = p.describe()
        console.print(f"{info['backend']} on {info['device']} ({info['artifact']}, precision {info['precision']})")


def cmd_predict(args):
    from ..kinds import get_kind
    from ..runtime import load
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    p = load(args.bundle, device=args.device, backend=args.backend, threads=args.threads)
    return get_kind(p.manifest.kind).cli_predict(p, args, UI())


def cmd_verify(args):
    from ..verify import verify
    report = verify(args.bundle, device=args.device)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        out.print(f"hashes: {report['hashes']} ({report['files']} files)")
        sig = report.get("signature") or {}
        if sig.get("signed_by"):
            out.print(f"signature: key {sig['signed_by']}, " + ("checked against OMEDGE_TRUSTED_KEYS" if sig["checked"]
                                                             else "not checked (OMEDGE_TRUSTED_KEYS is not set)"))
        rows = [(r["artifact"], r["backend"], r["device"], r.get("inference_precision") or "-", r["summary"],
                 r["result"]) for r in report["runs"]]
        out.print(_table("parity on this machine vs the stored reference",
                         ["artifact", "backend", "device", "exec precision", "figures", "result"], rows))
        for s in report["skipped"]:
            console.print(f"[dim]skipped: {escape(s)}[/dim]")   # "omedge[openvino]" is not markup
    return 0 if report["passed"] else 5


def cmd_keygen(args):
    from ..signing import generate_key
    key, pub = generate_key(args.output)
    out.print(f"private key {key} (keep it on the export workstation, mode 0600); public key {pub}: "
              "point OMEDGE_TRUSTED_KEYS at it (or at a folder of .pub files) on the devices")
    return 0


def cmd_sign(args):
    from ..signing import sign_bundle
    for bundle in args.bundles:
        out.print(f"{bundle}: signed with key {sign_bundle(bundle, args.key)}")
    return 0


def cmd_pack(args):
    from ..pack import pack
    backends = [b.strip() for b in args.backend.split(",") if b.strip()] if args.backend else None
    with console.status("packing") as status:
        def log(msg):
            status.update(msg)
            console.log(msg)
        kit = pack(args.bundles, args.output, backends=backends, platform=args.platform, python=args.python,
                   extras=args.extra, wheels=args.wheel, overwrite=args.overwrite, log=log)
    if args.json:
        print(json.dumps(kit, indent=2))
        return 0
    name = Path(kit["kit"]).name[:-len(".tar")]
    out.print(f"{kit['kit']}: {kit['bytes'] / 1e6:.1f} MB, {len(kit['bundles'])} bundle(s), {len(kit['wheels'])} "
              f"wheels for {kit['platform']} / Python {kit['python']} (backends {', '.join(kit['backends'])}"
              + (f"; extras {', '.join(kit['extras'])}" if kit["extras"] else "") + ")")
    script = "install.ps1" if kit["platform"].startswith("win") else "install.sh"
    out.print(f"on the target: tar xf {Path(kit['kit']).name} && {name}/{script} [VENV]")
    return 0


def cmd_bench(args):
    from ..bench import add_ratios, bench_bundle, bench_model, bench_volume
    target = Path(args.target)
    if args.profile:
        return _bench_profile(target, args)
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


def _bench_profile(target: Path, args) -> int:
    from ..profile import profile_backends, render
    if not target.is_dir():
        raise UsageError("--profile needs a bundle folder", "export one first: omedge export MODEL ... -o X.omedge")
    with console.status("profiling each backend"), _library_output_to_stderr():
        reports = profile_backends(target, device=args.device, runs=min(args.runs, 10), threads=args.threads,
                                   top=args.top)
    if args.json:
        print(json.dumps(reports, indent=2, default=str))
        return 0
    render(reports, out)
    return 0


def cmd_chat(args):
    """Interactive chat: tokens stream as they come; Ctrl-C stops an answer, Ctrl-C or
    Ctrl-D at the prompt leaves; history is trimmed to the context window."""
    from ..runtime import load
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
            for piece in p.chat(history, max_tokens=args.max_tokens, stream=True, mode=args.prompt_mode):
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
            cosines = [m["cosine_min"] for m in par["outputs"].values() if "cosine_min" in m]
            top1 = [m["top1_agreement"] for m in par["outputs"].values() if "top1_agreement" in m]
            ptxt = (f"cos {min(cosines):.5f}" if cosines else "") + (f" top-1 {min(top1):.3f}" if top1 else "")
            ptxt += "" if par["passed"] else " FAIL"
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


