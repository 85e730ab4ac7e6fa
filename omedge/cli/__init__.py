"""The `omedge` command: parse, call the Python API, print. Errors are printed without
a traceback (unless --debug) and exit with the error's own code. Ctrl-C exits 130 and
SIGTERM 143, both after the same unwinding, so no partial output is left behind."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager

from .. import __version__
from ..errors import OmedgeError
from ..kinds import all_kinds
from .commands import (  # noqa: F401
    bench_table,
    cmd_bench,
    cmd_chat,
    cmd_devices,
    cmd_export,
    cmd_keygen,
    cmd_models,
    cmd_pack,
    cmd_predict,
    cmd_sign,
    cmd_verify,
    console,
    out,
)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so `with` blocks unwind and
    remove their partial output (BundleWriter's `.X.omedge.partial-PID`)."""


_INTERRUPTED: list = []   # SIGINT / SIGTERM seen: libraries that turn them into another error still end 130 / 143


def _on_sigint(signum, frame):
    _INTERRUPTED.append(signum)
    raise KeyboardInterrupt


def _on_sigterm(signum, frame):
    _INTERRUPTED.append(signum)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second TERM must not cut the clean-up short
    raise Terminated()


@contextmanager
def _sigterm_unwinds():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    previous_int = signal.signal(signal.SIGINT, _on_sigint) \
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler else None
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)


def positive_int(text: str) -> int:
    """argparse type: a count that must be at least 1 (a clean usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _quiet_pillow_bomb_warning():
    """omedge refuses oversized images itself (io.images); Pillow's warning would only
    print two lines of library text above that message. This process is omedge's own."""
    import warnings
    try:
        from PIL import Image
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    except ImportError:
        pass


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="omedge", description="Export OpenMEDLab models to verified offline bundles "
                                 "and run them on the hardware at hand.")
    ap.add_argument("--version", action="version", version=f"omedge {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)
    from ..batch_cli import (
        add_parser as _add_batch,  # neither imports FastAPI, Ray or pyarrow here
    )
    from ..serve.cli import add_parser as _add_serve
    for add in (_add_models, _add_devices, _add_export, _add_predict, _add_chat, _add_bench, _add_verify,
                _add_serve, _add_batch, _add_keygen, _add_sign, _add_pack):
        add(sub)
    return ap


def _add_models(sub):
    s = sub.add_parser("models", help="list model ids, variants, tasks, licences")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_models)


def _add_devices(sub):
    s = sub.add_parser("devices", help="hardware found, usable backends, and why not")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_devices)


def _add_export(sub):
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
    s.add_argument("--threads", type=positive_int)
    s.add_argument("--calib", help="folder of calibration images, or 'synthetic'")
    s.add_argument("--calib-size", type=positive_int, default=64)
    s.add_argument("--verify-data", help="folder of inputs for the parity check, or 'synthetic' so that no patient "
                   "pixels are stored in the bundle (parity.npz otherwise keeps held-out calibration inputs)")
    s.add_argument("--record-names", action="store_true",
                   help="record calibration/verification file names in the manifest (default: counts and hashes)")
    s.add_argument("--labels", help="comma list of class names for a classifier head")
    s.add_argument("--frames", type=positive_int, help="video models: frames per clip (Endo-FM default 8)")
    s.add_argument("--crop", choices=["official", "center"],
                   help="video models: the official evaluation's left/top crop (default) or a centre crop")
    s.add_argument("--sam", metavar="PATH", help="medlsam: the SAM/MedSAM ViT-B checkpoint beside --weights medlam.pth")
    s.add_argument("--text-encoder", metavar="FOLDER", help="cite: local BioLinkBERT-large folder that embeds the "
                   "class names; miu-vl: local bert-base-uncased folder (config + vocab)")
    s.add_argument("--with-text-encoder", action="store_true", help="cite: ship the text tower so `predict --classes` "
                   "can name other classes on the device")
    s.add_argument("--classes", help="cite: comma list of class texts to embed instead of the file's own (same count)")
    s.add_argument("--image-size", metavar="HxW", help="miu-vl: the fixed input canvas, multiples of 32 "
                   "(default 800x1344)")
    s.add_argument("--prompt", help="miu-vl: the caption used for calibration and verification (default 'polyp')")
    s.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling (only for trusted files)")
    s.add_argument("-o", "--output", help="bundle folder (.omedge)")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--force", action="store_true", help="keep a bundle that fails parity (marked in the manifest)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_export)


def _add_predict(sub):
    s = sub.add_parser("predict", help="run a bundle on its inputs (images, videos, volumes, sequences, prompts)")
    s.add_argument("bundle")
    s.add_argument("inputs", nargs="*")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "gpu", "npu"])
    s.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "openvino", "llama.cpp"])
    s.add_argument("--threads", type=positive_int)
    s.add_argument("--batch-size", type=positive_int, help="images per run (default 8; volumes: windows per run, 1)")
    s.add_argument("-o", "--output", help="where to write the result (volumes: a .nii.gz label map, or a .dcm "
                   "DICOM-SEG; slides: the .h5 features)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    s.add_argument("--json", action="store_true")
    for kind in all_kinds():  # each kind adds the arguments only it reads
        kind.add_cli_arguments(s.add_argument_group(f"{kind.name} bundles"))
    s.set_defaults(func=cmd_predict)


def _add_chat(sub):
    s = sub.add_parser("chat", help="interactive chat with an LLM bundle (streaming)")
    s.add_argument("bundle")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--threads", type=positive_int)
    s.add_argument("--max-tokens", type=positive_int, default=512)
    s.add_argument("--prompt-mode", "--mode", dest="prompt_mode", choices=["qa", "consultation"])
    s.set_defaults(func=cmd_chat)


def _add_bench(sub):
    s = sub.add_parser("bench", help="backend x precision table (bundle, or model id to export and compare)")
    s.add_argument("target", help="a bundle folder or a model id")
    s.add_argument("--weights")
    s.add_argument("--variant")
    s.add_argument("--calib")
    s.add_argument("--device", default="cpu")
    s.add_argument("--batch", type=positive_int, default=1)
    s.add_argument("--runs", type=positive_int, default=20)
    s.add_argument("--seconds", type=float, default=5.0, help="minimum timing time per variant")
    s.add_argument("--threads", type=positive_int)
    s.add_argument("--input", help="segmentation bundles: time whole-volume inference on this NIfTI / DICOM")
    s.add_argument("--throughput", action="store_true",
                   help="also measure with several requests in flight (OpenVINO streams)")
    s.add_argument("--profile", action="store_true",
                   help="where the time goes: the slowest nodes and op types, with the kernel each ran, per backend")
    s.add_argument("--top", type=positive_int, default=15, help="--profile: how many nodes to list")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench)


def _add_verify(sub):
    s = sub.add_parser("verify", help="re-check hashes and parity on this machine")
    s.add_argument("bundle")
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify)


def _add_keygen(sub):
    s = sub.add_parser("keygen", help="make a site signing key pair (PREFIX.key, PREFIX.pub)")
    s.add_argument("-o", "--output", required=True, help="path prefix of the two files")
    s.set_defaults(func=cmd_keygen)


def _add_sign(sub):
    s = sub.add_parser("sign", help="sign bundles with the site key (devices check it via OMEDGE_TRUSTED_KEYS)")
    s.add_argument("bundles", nargs="+")
    s.add_argument("--key", required=True, help="the private key `omedge keygen` wrote")
    s.set_defaults(func=cmd_sign)


def _add_pack(sub):
    s = sub.add_parser("pack", help="bundle(s) + run-side wheels + install script: one tar for a machine "
                       "with no network")
    s.add_argument("bundles", nargs="+")
    s.add_argument("-o", "--output", required=True, help="the kit, KIT.tar (it unpacks to KIT/)")
    s.add_argument("--backend", help="comma list of onnxruntime, openvino, llama.cpp (default: every backend "
                   "the bundles are verified on)")
    s.add_argument("--platform", help="linux-x86_64, linux-aarch64, win-amd64, macos-arm64, or a tag such as "
                   "manylinux_2_31_x86_64 (default: this machine)")
    s.add_argument("--python", help="the target's Python as X.Y (default: this one)")
    s.add_argument("--extra", action="append", default=[], help="more omedge extras for the kit, e.g. wsi,dicom")
    s.add_argument("--wheel", action="append", default=[], metavar="PATH",
                   help="a wheel the index lacks for the target (built on a machine of that platform); repeatable")
    s.add_argument("--overwrite", action="store_true", help="replace an existing kit tar")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_pack)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_pillow_bomb_warning()
    try:
        with _sigterm_unwinds():
            return args.func(args)
    except KeyboardInterrupt:   # Ctrl-C, or SIGTERM (Terminated)
        return _interrupted()
    except OmedgeError as e:
        if _INTERRUPTED:   # e.g. a backend import that a Ctrl-C broke reads as "fails to load"
            return _interrupted()
        if args.debug:
            console.print_exception()
        console.print(f"[bold red]error:[/bold red] {e.message}")
        if e.hint:
            console.print(f"  -> {e.hint}")
        return e.exit_code
    except Exception:
        if _INTERRUPTED:   # a library (numpy, pybind11 module init) turned the Ctrl-C into another error
            return _interrupted()
        raise


_LEFT = ("nothing was left half-written (a slide's .NAME.partial features file is kept: rerun the same "
         "command to resume it)")


def _interrupted() -> int:
    if signal.SIGTERM in _INTERRUPTED:
        console.print("[bold red]terminated[/bold red] (SIGTERM): " + _LEFT)
        return 143
    console.print("[bold red]interrupted[/bold red]: " + _LEFT)
    return 130


if __name__ == "__main__":
    sys.exit(main())
