"""The declared-contract rules that keep the package simple, checked on the source."""
import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "omedge"
SOURCES = sorted(PACKAGE.rglob("*.py"))
# Kind dispatch belongs to omedge/kinds/: nobody else asks which kind a bundle is.
_NAMES = r"(image|video|volume|sequence|text-generation|segmentation|classification|embedding)"
KIND_SNIFFING = re.compile(r"(kind|task|kind\.name)\s*[!=]=\s*[\"']" + _NAMES + r"|(pre|preprocess)\w*(\[[\"']kind[\"']\]|\.get\([\"']kind)"
                           r"|\[[\"']task[\"']\]\s*==")


def test_no_kind_sniffing_outside_the_kind_modules():
    offenders = []
    for path in SOURCES:
        if path.parent.name == "kinds":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if KIND_SNIFFING.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert not offenders, "dispatch on the kind instead:\n" + "\n".join(offenders)


def test_only_the_recipe_table_knows_format_precision_rules():
    """Gate classes and backend lists are read from omedge.formats, not restated."""
    offenders = [str(p.relative_to(PACKAGE)) for p in SOURCES if p.name != "formats.py"
                 and re.search(r"FORMAT_BACKENDS|OV_HINTS|\"int8-dynamic\"\s*:", p.read_text())]
    assert not offenders


def test_only_the_llama_backend_constructs_llama():
    users = [str(p.relative_to(PACKAGE)) for p in SOURCES if "llama_cpp.Llama(" in p.read_text()]
    assert users == ["runtime/backends/llama.py"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_small_pieces(path):
    """No module over ~400 lines, no function over ~60 (DESIGN rule 10)."""
    text = path.read_text()
    assert len(text.splitlines()) <= 420, f"{path.name} has {len(text.splitlines())} lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 75]
    assert not long, long


def test_run_side_modules_never_import_torch():
    run_side = [p for p in SOURCES if p.parts[-2] in ("kinds", "runtime", "backends", "devices", "io", "serve")
                or p.name in ("spec.py", "formats.py", "manifest.py", "bundle.py", "parity.py", "verify.py",
                              "signing.py", "batch.py", "batch_ray.py", "batch_cli.py", "batch_inputs.py",
                              "grounding.py", "pictures.py",
                              "wsi.py", "profile.py", "pack.py")]
    offenders = [str(p.relative_to(PACKAGE)) for p in run_side
                 if re.search(r"^\s*(import torch|from torch|import nncf|import transformers)", p.read_text(), re.M)]
    assert not offenders


def test_import_omedge_changes_nothing_in_the_callers_process():
    import subprocess
    import sys
    code = ("import os, sys; env = dict(os.environ); mods = set(sys.modules); import omedge; "
            "added = {m for m in set(sys.modules) - mods if not m.startswith('omedge')}; "
            "blocked = [m for m, v in sys.modules.items() if v is None]; "
            "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items()); "
            "assert not blocked, blocked; assert 'openvino' not in added and 'torch' not in added, added; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]
