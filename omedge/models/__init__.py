"""Model registry and checkpoint loading (build side: imports torch).

Each family module declares one or more `ModelSpec`s in `SPECS`. Listing ids needs no
torch (family modules import it lazily or at the top; `all_specs` imports them)."""
from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import CheckpointError, UsageError
from ..spec import ModelSpec

FAMILY_MODULES = ("brow", "pathoduet", "deblurring", "convmae", "endofm", "stunet", "misfm", "pctnet", "pulse",
                  "prime", "sam", "medlsam", "cite", "miuvl")
ALIASES = {"pulse": "pulse-7b"}  # `omedge export pulse` detects 7b / 20b from the folder


def all_specs() -> dict[str, ModelSpec]:
    specs = {}
    for name in FAMILY_MODULES:
        for spec in importlib.import_module(f"{__name__}.{name}").SPECS:
            specs[spec.id] = spec
    return specs


def get_spec(model_id: str) -> ModelSpec:
    specs = all_specs()
    model_id = ALIASES.get(model_id, model_id)
    if model_id not in specs:
        raise UsageError(f"unknown model id '{model_id}'", f"known ids: {', '.join(specs)} (see `omedge models`)")
    return specs[model_id]


def build(spec: ModelSpec, variant: str, seed: int = 0, **options):
    """A model with seeded random weights (for tests and weight-free demos)."""
    import torch
    _check_variant(spec, variant)
    if spec.build is None:
        raise UsageError(f"{spec.id} is not built from a torch module", "export it from its checkpoint folder")
    torch.manual_seed(seed)
    return spec.build(variant, **{**spec.default_options, **options}).eval()


def _check_variant(spec, variant):
    if variant not in spec.variants:
        raise UsageError(f"{spec.id} has no variant '{variant}'", f"variants: {', '.join(spec.variants)}")


def _match(spec: ModelSpec, sd: dict, options: dict, variant: str):
    import torch

    from .checkpoint import compare
    with torch.device("meta"):
        model_sd = spec.build(variant, **options).state_dict()
    return compare(model_sd, sd)


def identify(raw) -> list[tuple[str, str]]:
    """Which (model id, variant) pairs a checkpoint loads into exactly."""
    hits = []
    for spec in all_specs().values():
        if spec.remap is None:
            continue
        try:
            sd, options = spec.remap(raw)
        except CheckpointError:
            continue
        for variant in spec.variants:
            if not any(_match(spec, sd, options, variant)):
                hits.append((spec.id, variant))
    return hits


def load(spec: ModelSpec, weights: str | Path, variant: str | None = None, trust: bool = False,
         **build_options):
    """Load an official checkpoint strictly. Returns (module, variant, options).
    build_options: choices of the deployment that the file does not fix (e.g. an
    Endo-FM clip length); they must not change which parameters exist."""
    from .checkpoint import describe_mismatch
    raw, build_options = _read_weights(spec, weights, trust, build_options)
    if variant is not None:
        _check_variant(spec, variant)
    try:
        sd, options = spec.remap(raw)
    except CheckpointError as e:
        raise _wrong_model(spec, raw, str(e)) from None
    options = {**options, **build_options}
    tried = [variant] if variant else list(spec.variants)
    for v in tried:
        if not any(_match(spec, sd, options, v)):
            model = spec.build(v, **options)
            model.load_state_dict(sd, strict=True)
            return model.eval(), v, options
    detail = describe_mismatch(*_match(spec, sd, options, tried[0]))
    if variant:
        other = [v for v in spec.variants if v != variant and not any(_match(spec, sd, options, v))]
        if other:
            raise CheckpointError(f"{Path(weights).name} is {spec.id} variant '{other[0]}', not '{variant}'",
                                  f"use --variant {other[0]}")
    raise _wrong_model(spec, raw, f"{Path(weights).name} does not match {spec.id} "
                                  f"(variant {tried[0]}): {detail}")


def _read_weights(spec, weights, trust: bool, build_options: dict) -> tuple[dict, dict]:
    """The family module's `read_weights(path, trust, options) -> (raw, options left)` when
    it has one (MedLSAM: two files, --weights + --sam), else the one file, safely read."""
    from .checkpoint import read_checkpoint
    family = importlib.import_module(spec.build.__module__) if spec.build is not None else None
    reader = getattr(family, "read_weights", None)
    if reader is not None:
        return reader(weights, trust, build_options)
    return read_checkpoint(weights, trust=trust), build_options


def _wrong_model(spec, raw, message) -> CheckpointError:
    hits = [h for h in identify(raw) if h[0] != spec.id]
    if hits:
        mid, v = hits[0]
        return CheckpointError(f"{message}. It looks like a '{mid}' checkpoint (variant {v})",
                               f"run `omedge export {mid} --variant {v} --weights ...`")
    return CheckpointError(message, "check that this is the official checkpoint for this model; "
                                    "`omedge models` lists the ids")
