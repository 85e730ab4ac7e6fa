"""The bundle manifest: dataclasses, a JSON schema validated on every read, and a
hash of the manifest's canonical form kept beside it (`manifest.sha256`), so an
edited manifest is refused before any of its facts are used.

Facts are copied from the ModelSpec and the recipe table at export, never guessed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import BundleIntegrityError

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.sha256"

_STR, _INT, _BOOL, _OBJ, _ARR = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, \
    {"type": "object"}, {"type": "array"}
_TENSOR = {"type": "object", "required": ["name", "layout", "dtype", "shape"],
           "properties": {"name": _STR, "layout": _STR, "dtype": _STR, "shape": _ARR, "dynamic": _OBJ,
                          "multiple_of": _OBJ}}
_ARTIFACT = {"type": "object", "required": ["name", "role", "format", "precision", "entry", "files", "parity",
                                            "verified_backends", "runtime"],
             "properties": {"name": _STR, "role": _STR, "format": _STR, "precision": _STR, "entry": _STR,
                            "files": {"type": "array", "items": _STR}, "parity": _OBJ,
                            "verified_backends": {"type": "array", "items": _STR}, "runtime": _OBJ,
                            "inputs": {"type": "array", "items": _STR},
                            "outputs": {"type": "array", "items": _STR}}}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema", "title": "omedge bundle manifest",
    "type": "object",
    "required": ["schema_version", "created", "model", "weights", "inputs", "outputs", "primary_output",
                 "preprocess", "artifacts", "verification", "files"],
    "properties": {
        "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
        "created": _STR,
        "model": {"type": "object", "required": ["id", "variant", "kind", "title", "licence", "source"],
                  "properties": {"id": _STR, "variant": _STR, "kind": _STR, "title": _STR, "licence": _STR,
                                 "source": _STR, "parameters": _INT, "options": _OBJ}},
        "weights": {"type": "object", "required": ["source"], "properties": {"source": _STR}},
        "inputs": {"type": "array", "items": _TENSOR}, "outputs": {"type": "array", "items": _TENSOR},
        "primary_output": _STR, "labels": {"type": ["array", "null"], "items": _STR},
        "preprocess": _OBJ, "artifacts": {"type": "array", "items": _ARTIFACT},
        "constants": {"type": "object"}, "calibration": {"type": ["object", "null"]},
        "verification": {"type": "object", "required": ["file"], "properties": {"file": _STR}},
        "export": _OBJ, "extra": _OBJ, "tools": _OBJ, "forced": _BOOL,
        "files": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["sha256", "bytes"], "properties": {"sha256": _STR, "bytes": _INT}}},
    },
}
_TYPES = {"string": str, "integer": int, "boolean": bool, "object": dict, "array": list, "null": type(None),
          "number": (int, float)}


def schema_errors(value, schema: dict, where: str = "manifest", depth: int = 0) -> list[str]:
    """The subset of JSON Schema the manifest uses (type, enum, required, properties,
    items, additionalProperties), checked without a third-party dependency."""
    if depth > 32:
        return [f"{where}: nested too deeply"]
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        ok = any(isinstance(value, _TYPES[t]) and not (t == "integer" and isinstance(value, bool)) for t in names)
        if not ok:
            return [f"{where}: expected {' or '.join(names)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} is not one of {schema['enum']}"]
    errors = []
    if isinstance(value, dict):
        errors += [f"{where}: missing '{k}'" for k in schema.get("required", []) if k not in value]
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                errors += schema_errors(value[k], sub, f"{where}.{k}", depth + 1)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for k, v in value.items():
                errors += schema_errors(v, extra, f"{where}.{k}", depth + 1)
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += schema_errors(v, schema["items"], f"{where}[{i}]", depth + 1)
    return errors


@dataclass
class Artifact:
    """One graph file set of a bundle (a bundle may hold several, one per role)."""
    name: str
    format: str
    precision: str
    entry: str
    files: list[str]
    role: str = "model"
    runtime: dict = field(default_factory=dict)          # backend -> options, from the recipe
    parity: dict = field(default_factory=dict)           # the kind's metric, per backend
    verified_backends: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    quantization: dict | None = None

    def passed_on(self, backend: str) -> bool:
        """Verified on `backend`, and that backend's own parity record agrees."""
        per_backend = self.parity.get("backends", {})
        return backend in self.verified_backends and per_backend.get(backend, {}).get("passed") is True


@dataclass
class Manifest:
    model: dict
    weights: dict
    inputs: list[dict]
    outputs: list[dict]
    primary_output: str
    preprocess: dict
    artifacts: list[Artifact]
    verification: dict
    created: str = ""
    labels: list[str] | None = None
    constants: dict = field(default_factory=dict)        # name -> {"file", "shape", "dtype"}
    calibration: dict | None = None
    export: dict = field(default_factory=dict)           # exporter records (opset, dynamic axes, ...)
    extra: dict = field(default_factory=dict)            # kind-specific facts (LLM context, ...)
    tools: dict = field(default_factory=dict)
    forced: bool = False
    files: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def kind(self) -> str:
        return self.model["kind"]

    def input(self, name: str | None = None) -> dict:
        return self.inputs[0] if name is None else next(i for i in self.inputs if i["name"] == name)

    def artifacts_for(self, role: str = "model") -> list[Artifact]:
        return [a for a in self.artifacts if a.role == role]

    def roles(self) -> list[str]:
        """Graph roles in run order (the order of the artifacts); one-graph bundles: ["model"]."""
        return list(dict.fromkeys(a.role for a in self.artifacts)) or ["model"]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data, where: str = "manifest") -> "Manifest":
        if not isinstance(data, dict):
            raise BundleIntegrityError(f"{where} is not a JSON object", "re-export the bundle")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleIntegrityError(f"{where} has schema version {version}; this omedge reads "
                                       f"version {SCHEMA_VERSION}", "re-export the bundle with this omedge "
                                       "(`omedge export ...`): the older layout guessed facts this one declares")
        errors = schema_errors(data, SCHEMA, where)
        if errors:
            raise BundleIntegrityError(f"{where} fails its schema: " + "; ".join(errors[:5]),
                                       "the bundle is damaged or was edited: copy it again from its source")
        known = {f.name for f in fields(cls)}
        body = {k: v for k, v in data.items() if k in known}
        body["artifacts"] = [Artifact(**{k: v for k, v in a.items() if k in _ARTIFACT_FIELDS})
                             for a in data["artifacts"]]
        return cls(**body)


_ARTIFACT_FIELDS = {f.name for f in fields(Artifact)}


def canonical_hash(data: dict) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def write_manifest(folder: Path, manifest: Manifest) -> None:
    import os
    data = json.loads(json.dumps(manifest.to_dict()))  # as it will be read back: integer keys become strings
    for name, text in ((MANIFEST, json.dumps(data, indent=2)), (MANIFEST_HASH, canonical_hash(data) + "\n")):
        with open(folder / name, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def read_manifest(bundle: str | Path, check_signature: bool = True) -> Manifest:
    """Read, hash-check and schema-check a bundle's manifest (and, where the site trusts
    signing keys, its signature); raise BundleIntegrityError."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir() or not path.is_file() or path.is_symlink():
        raise BundleIntegrityError(f"{bundle} is not an omedge bundle (no {MANIFEST})",
                                   "give the .omedge folder that `omedge export` wrote")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BundleIntegrityError(f"{path} is damaged: {str(e)[:200]}") from None
    if isinstance(data, dict) and data.get("schema_version") != SCHEMA_VERSION:
        return Manifest.from_dict(data, str(path))  # raises the "re-export" message
    digest = stored_hash(bundle)
    if isinstance(data, dict) and digest != canonical_hash(data):
        raise BundleIntegrityError(f"{path} was modified after export (its hash differs from {MANIFEST_HASH})",
                                   "never edit a bundle: copy it again from its source or re-export it")
    manifest = Manifest.from_dict(data, str(path))
    if check_signature:
        from .signing import signature_status
        manifest.signature = signature_status(bundle, digest)
    return manifest


def stored_hash(bundle: Path) -> str:
    stored = Path(bundle) / MANIFEST_HASH
    if not stored.is_file() or stored.is_symlink():
        raise BundleIntegrityError(f"{Path(bundle).name} has no {MANIFEST_HASH}", "re-export the bundle")
    return stored.read_text().strip()
