"""What a deployable model is, declared as data (stdlib only: both sides import it).

A family module (`omedge/models/<family>.py`) fills in a `ModelSpec` and adds two
functions, `build(variant, **options)` and `remap(official_state_dict)`. Everything
the exporter, the manifest and the runtime need to know about inputs, outputs, layout
and gates is read from here, never guessed from tensor shapes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

LAYOUTS = ("NCHW", "NCTHW", "NCDHW", "NC", "NL", "NLC", "N", "text")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output.

    shape: sizes with None where `dynamic` names the axis; multiple_of: axis -> the
    multiple a dynamic size must have; when: the build option that must be truthy for
    this output to exist (e.g. a classifier head: "num_classes")."""
    name: str
    layout: str
    dtype: str = "float32"
    shape: tuple = ()
    dynamic: dict = field(default_factory=dict)
    multiple_of: dict = field(default_factory=dict)
    when: str | None = None
    description: str = ""

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"{self.name}: unknown layout {self.layout!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["dynamic"] = {str(k): v for k, v in self.dynamic.items()}
        d["multiple_of"] = {str(k): v for k, v in self.multiple_of.items()}
        d.pop("when")
        return d

    def with_size(self, axis: int, size: int | None) -> "TensorSpec":
        shape = list(self.shape)
        shape[axis] = size
        return replace(self, shape=tuple(shape))


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph of a bundle; a bundle with several (SAM: encoder + decoder)
    gives each its own role. `inputs`/`outputs` name TensorSpecs of the ModelSpec; an
    input that an earlier graph outputs is chained to it (see omedge/exporters/graphs.py).
    quantize: "yes" (every recipe), "if-passes" (an INT8 artifact of this graph that fails
    its gate is replaced by the fp32 one of the same format, and the manifest says so), or
    "no" (always the fp32 one: CITE's text tower runs a few times per class list).
    when: the build option that must be truthy for this graph to exist (CITE's text tower)."""
    role: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    quantize: str = "yes"
    when: str | None = None


@dataclass
class ModelSpec:
    id: str
    title: str
    kind: str                            # a key of omedge.kinds.KINDS
    variants: tuple[str, ...]            # "tiny" is the test-sized variant of the same code
    default_variant: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    primary_output: str                  # what `predict` returns by default
    preprocess: dict[str, Any]           # the official preprocessing as data, run in numpy
    licence: str
    source: str
    build: Callable[..., Any] | None = None            # build(variant, **options) -> torch module
    remap: Callable[[dict], tuple[dict, dict]] | None = None  # official sd -> (our sd, build options)
    graphs: tuple[GraphSpec, ...] = ()   # default: one graph "model" with all inputs and outputs
    constants: tuple[str, ...] = ()      # names of arrays stored beside the graphs
    labels: list[str] | None = None      # class names of a classifier / segmentation head
    parity: dict = field(default_factory=dict)          # per-precision gate overrides
    default_options: dict = field(default_factory=dict)  # build options for random weights
    exporter: str | None = None          # "module:function" for families not exported from torch (GGUF)
    onnx_opset: int | None = None        # an opset above the exporter's default (MIU-VL's DeformConv: 19)
    official: dict = field(default_factory=dict)  # the official code the preprocessing reproduces
    notes: str = ""

    def outputs_for(self, options: dict) -> tuple[TensorSpec, ...]:
        """The outputs a model built with `options` has (a head only when the file has one)."""
        return tuple(o for o in self.outputs if o.when is None or options.get(o.when))

    def inputs_for(self, options: dict) -> tuple[TensorSpec, ...]:
        """The inputs of the graphs a model built with `options` exports."""
        used = {n for g in self.graphs_for(options) for n in g.inputs}
        return tuple(i for i in self.inputs if i.name in used)

    def primary_for(self, options: dict) -> str:
        names = [o.name for o in self.outputs_for(options)]
        return self.primary_output if self.primary_output in names else names[0]

    def graphs_for(self, options: dict) -> tuple[GraphSpec, ...]:
        if self.graphs:
            return tuple(g for g in self.graphs if g.when is None or options.get(g.when))
        return (GraphSpec("model", tuple(i.name for i in self.inputs),
                          tuple(o.name for o in self.outputs_for(options))),)

    def summary(self) -> dict:
        return {"id": self.id, "title": self.title, "kind": self.kind, "variants": list(self.variants),
                "default_variant": self.default_variant, "licence": self.licence, "source": self.source,
                "outputs": [o.name + (f" (with {o.when})" if o.when else "") for o in self.outputs],
                "official": self.official, "preprocess": self.preprocess}


def image_input(size: int = 224, name: str = "pixel_values") -> TensorSpec:
    return TensorSpec(name, "NCHW", shape=(None, 3, size, size), dynamic={0: "batch"})


def embedding_output(dim: int | None = None, name: str = "embedding") -> TensorSpec:
    return TensorSpec(name, "NC", shape=(None, dim), dynamic={0: "batch"})


def logits_output(when: str | None = "num_classes") -> TensorSpec:
    return TensorSpec("logits", "NC", shape=(None, None), dynamic={0: "batch"}, when=when,
                      description="class scores before softmax")
