"""Site signatures on bundles (Ed25519), for sites that must know *who* made a bundle.

`manifest.sha256` catches accidental edits, but anyone can recompute a hash. A site
keeps a private key on its export workstation (`omedge keygen`), signs each bundle it
releases (`omedge sign`), and points its devices at the public keys with
`OMEDGE_TRUSTED_KEYS` (a `.pub` file or a folder of them). Where that variable is set,
every bundle must carry a valid signature by one of those keys before anything loads.
The signature covers the manifest's canonical hash, and the manifest lists every
file's sha256, so it covers the whole bundle. `manifest.sig` is outside `files`, so
signing after export changes nothing else.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from .errors import BundleIntegrityError, UsageError

SIGNATURE = "manifest.sig"
ENV = "OMEDGE_TRUSTED_KEYS"
_DOMAIN = b"omedge-manifest-v2:"   # what is signed: this prefix + the manifest's canonical sha256


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise UsageError("bundle signatures need the cryptography package",
                         "pip install 'omedge[sign]'") from None
    return serialization, ed25519


def key_id(public_key) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_key(prefix: str | Path) -> tuple[Path, Path]:
    """PREFIX.key (private, mode 0600; keep it on the export workstation) + PREFIX.pub."""
    serialization, ed25519 = _crypto()
    private = ed25519.Ed25519PrivateKey.generate()
    key, pub = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for path in (key, pub):
        if path.exists():
            raise UsageError(f"{path} already exists", "choose another name; never overwrite a site key")
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, pub


def sign_bundle(bundle: str | Path, key_file: str | Path) -> str:
    """Sign a bundle in place (after its hashes are checked); returns the key id."""
    from .bundle import verify_files
    from .manifest import read_manifest, stored_hash
    serialization, ed25519 = _crypto()
    bundle = Path(bundle)
    manifest = read_manifest(bundle, check_signature=False)
    verify_files(bundle, manifest)
    try:
        private = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"cannot read the private key {key_file}: {e}", "give the .key file `omedge keygen` wrote")
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise UsageError(f"{key_file} is not an Ed25519 private key", "make one with `omedge keygen`")
    digest = stored_hash(bundle)
    record = {"algorithm": "ed25519", "key_id": key_id(private.public_key()), "manifest_sha256": digest,
              "signature": base64.b64encode(private.sign(_DOMAIN + digest.encode())).decode()}
    tmp = bundle / f".{SIGNATURE}.{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, bundle / SIGNATURE)
    return record["key_id"]


def trusted_keys() -> dict:
    """key id -> public key, from OMEDGE_TRUSTED_KEYS; {} when the site trusts hashes only."""
    where = os.environ.get(ENV)
    if not where:
        return {}
    serialization, ed25519 = _crypto()
    path = Path(where)
    files = sorted(path.glob("*.pub")) if path.is_dir() else [path]
    keys = {}
    for f in files:
        try:
            key = serialization.load_pem_public_key(f.read_bytes())
        except (OSError, ValueError) as e:
            raise UsageError(f"{ENV}: cannot read the public key {f}: {e}") from None
        if isinstance(key, ed25519.Ed25519PublicKey):
            keys[key_id(key)] = key
    if not keys:
        raise UsageError(f"{ENV}={where} names no Ed25519 public key",
                         "point it at the .pub file(s) `omedge keygen` wrote, or unset it")
    return keys


def signature_status(bundle: str | Path, digest: str) -> dict:
    """Check the bundle's signature when the site trusts keys; describe it either way."""
    keys = trusted_keys()
    path = Path(bundle) / SIGNATURE
    record = _read_record(path) if path.is_file() and not path.is_symlink() else None
    if not keys:
        return {"signed_by": record.get("key_id") if record else None, "checked": False}
    if record is None:
        _refuse(bundle, "it is not signed", "sign it with the site key (`omedge sign`) before deploying it")
    key = keys.get(record.get("key_id"))
    if key is None:
        _refuse(bundle, f"it is signed by key {record.get('key_id')!r}, which {ENV} does not trust",
                "sign it with one of this site's keys")
    if record.get("manifest_sha256") != digest:
        _refuse(bundle, "its signature is for another manifest", "sign the bundle again after any re-export")
    try:
        key.verify(base64.b64decode(record.get("signature", ""), validate=True), _DOMAIN + digest.encode())
    except Exception:  # noqa: BLE001 - InvalidSignature or undecodable base64: both mean forged
        _refuse(bundle, "its signature does not verify", "the bundle was altered or signed with another key")
    return {"signed_by": record["key_id"], "checked": True}


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        record = None
    return record if isinstance(record, dict) else {}


def _refuse(bundle, why: str, hint: str):
    raise BundleIntegrityError(f"bundle {Path(bundle).name} is refused: {why} ({ENV} is set)", hint)
