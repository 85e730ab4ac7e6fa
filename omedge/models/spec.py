"""What a deployable model is: data (ids, variants, preprocessing, outputs, licence)
plus two functions, `build(variant, options)` and `remap(official_state_dict)`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class ModelSpec:
    id: str
    title: str
    task: str                      # "embedding" | "classification"
    variants: tuple[str, ...]      # "tiny" is the test-sized variant of the same code
    default_variant: str
    preprocess: dict[str, Any]     # run by omedge.runtime.preprocess, in numpy
    licence: str
    source: str
    build: Callable[..., Any]      # build(variant, **options) -> torch.nn.Module
    remap: Callable[[dict], tuple[dict, dict]]  # official sd -> (our sd, build options)
    input_name: str = "pixel_values"
    input_shape: tuple = (None, 3, 224, 224)
    labels: list[str] | None = None     # for classifier heads
    notes: str = ""
    default_options: dict = field(default_factory=dict)  # build options for random weights

    def summary(self) -> dict:
        return {"id": self.id, "title": self.title, "task": self.task, "variants": list(self.variants),
                "default_variant": self.default_variant, "licence": self.licence, "source": self.source}
