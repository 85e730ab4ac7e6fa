"""The manifest contract: schema-checked and hash-checked on every read, and a bundle
of the previous schema is refused with a clear message."""
import json
import shutil

import pytest

import omedge
from omedge.bundle import bundle_file
from omedge.errors import BundleIntegrityError
from omedge.manifest import MANIFEST_HASH, SCHEMA, canonical_hash, read_manifest, schema_errors


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return omedge.export("brow", variant="tiny", random_weights=True,
                         out=tmp_path_factory.mktemp("m") / "brow.omedge")


def _rewrite(src, dst, edit, rehash=True):
    shutil.copytree(src, dst)
    data = json.loads((dst / "manifest.json").read_text())
    data = edit(data)
    (dst / "manifest.json").write_text(json.dumps(data))
    if rehash and isinstance(data, dict):
        (dst / MANIFEST_HASH).write_text(canonical_hash(data))
    return dst


def test_facts_come_from_the_spec(bundle):
    m = read_manifest(bundle)
    assert m.kind == "image" and m.inputs[0]["layout"] == "NCHW" and m.primary_output == "embedding"
    assert [o["name"] for o in m.outputs] == ["embedding"] and m.inputs[0]["dynamic"] == {"0": "batch"}
    assert not schema_errors(m.to_dict(), SCHEMA)
    # every preprocessing choice names the official code it reproduces
    assert m.preprocess["official"]["repo"] == "openmedlab/BROW" and "extract_features.py" in m.preprocess[
        "official"]["entry"] and m.preprocess["alpha"] == "drop"


def test_an_edited_manifest_is_refused(bundle, tmp_path):
    def loosen(d):
        d["preprocess"]["mean"] = [0, 0, 0]
        return d
    b = _rewrite(bundle, tmp_path / "b.omedge", loosen, rehash=False)
    with pytest.raises(BundleIntegrityError, match="modified after export"):
        omedge.load(b)


@pytest.mark.parametrize("edit, message", [
    (lambda d: [d], "not a JSON object"),
    (lambda d: {k: v for k, v in d.items() if k != "artifacts"}, "missing 'artifacts'"),
    (lambda d: {**d, "files": list(d["files"])}, "files: expected object"),
    (lambda d: {**d, "inputs": [{"name": "x"}]}, "missing 'layout'"),
])
def test_a_manifest_that_fails_its_schema_is_refused(bundle, tmp_path, edit, message):
    b = _rewrite(bundle, tmp_path / "b.omedge", edit)
    with pytest.raises(BundleIntegrityError, match=message):
        omedge.load(b)


def test_deeply_nested_json_is_a_clear_error(bundle, tmp_path):
    b = tmp_path / "deep.omedge"
    shutil.copytree(bundle, b)
    (b / "manifest.json").write_text("[" * 200000 + "]" * 200000)
    with pytest.raises(BundleIntegrityError, match="damaged"):
        omedge.load(b)


def test_the_previous_schema_asks_for_a_re_export(bundle, tmp_path):
    b = _rewrite(bundle, tmp_path / "old.omedge", lambda d: {**d, "schema_version": 1})
    with pytest.raises(BundleIntegrityError, match="schema version 1.*re-export|re-export"):
        omedge.load(b)


@pytest.mark.parametrize("entry", ["../other.omedge/model.onnx", "/etc/passwd", "notes.txt"])
def test_an_entry_outside_the_listed_files_is_refused(bundle, tmp_path, entry):
    def point(d):
        d["artifacts"][0]["entry"] = entry
        return d
    b = _rewrite(bundle, tmp_path / "b.omedge", point)
    (b / "notes.txt").write_text("not listed")
    with pytest.raises(BundleIntegrityError, match="outside itself|does not list"):
        omedge.load(b)


def test_bundle_paths_are_confined(bundle):
    m = read_manifest(bundle)
    assert bundle_file(bundle, "model.onnx", m) == bundle / "model.onnx"
    for bad in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(BundleIntegrityError):
            bundle_file(bundle, bad, m)
