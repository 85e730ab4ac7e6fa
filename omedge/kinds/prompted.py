"""Prompted classification (CITE): an image kind whose classes are text. The image graph
gives the neck embedding and 100 * cosine logits against the class-name embeddings stored
at export; a bundle exported `--with-text-encoder` also has the BERT graph (`text`) and
its vocabulary, so `--classes` can name other classes on the device, offline."""
from __future__ import annotations

import numpy as np

from ..errors import ExportError, InputError, UsageError
from ..parity import compare, cosine_rows
from ..runtime.predictor import softmax
from .image import ImageKind, ImagePredictor

EXPORT_OPTIONS = ("text_encoder", "with_text_encoder", "classes")


def wordpiece(vocab: np.ndarray, lower_case: bool):
    """The run-side BERT tokenizer from the stored vocabulary (no transformers, no torch)."""
    try:
        from tokenizers import BertWordPieceTokenizer
    except ImportError:
        raise UsageError("naming classes on the device needs the tokenizers package",
                         'pip install "omedge[text]"') from None
    return BertWordPieceTokenizer({str(t): i for i, t in enumerate(vocab)}, lowercase=lower_case)


class PromptedPredictor(ImagePredictor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._classes = None   # (names, unit-norm embeddings) set by set_classes

    @property
    def has_text_encoder(self) -> bool:
        return "text" in self.graphs

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """BERT pooler_output of each text, tokenised alone ([CLS] text [SEP]) and rounded to
        fp16 as the official head keeps its class embeddings."""
        if not self.has_text_encoder:
            raise UsageError("this CITE bundle has no text encoder, so it cannot embed new class names",
                             "export it again with --with-text-encoder (and --text-encoder FOLDER), or use the "
                             f"classes it was exported with: {', '.join(self.labels or [])}")
        texts = [t.strip() for t in texts]
        if not texts or any(not t for t in texts):
            raise InputError("class names must not be empty", 'give --classes "name one,name two,..."')
        text_pre = self.manifest.preprocess.get("text", {})
        tok = wordpiece(self.constant("vocab"), bool(text_pre.get("lower_case", True)))
        rows = []
        for t in texts:
            ids = tok.encode(t).ids
            if len(ids) > int(text_pre.get("max_tokens", 512)):
                raise InputError(f"class name {t[:40]!r}... is {len(ids)} tokens; the text encoder takes at most "
                                 f"{text_pre.get('max_tokens', 512)}")
            feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
            rows.append(self.run_graph("text", feed)["text_embedding"])
        return np.concatenate(rows).astype(np.float16).astype(np.float32)

    def set_classes(self, names: list[str] | None) -> None:
        """Use these class names instead of the exported ones (None: back to those)."""
        if names is None:
            self._classes = None
            self.labels = self.manifest.labels
            return
        emb = self.embed_texts(names)
        self._classes = (list(names), emb / np.linalg.norm(emb, axis=1, keepdims=True))
        self.labels = list(names)

    def run(self, batch, batch_size: int = 8) -> dict:
        out = super().run(batch, batch_size)
        if self._classes is not None and "embedding" in out:  # the head again, against the new names
            e = out["embedding"].astype(np.float32)
            e = e / np.linalg.norm(e, axis=1, keepdims=True)
            out["logits"] = (float(self.manifest.preprocess.get("logit_scale", 100.0)) * e @ self._classes[1].T)
        return out

    def predict(self, images, batch_size: int = 8, return_dict: bool = False, classes: list[str] | None = None):
        """As the image kind; `classes`: other class names for this call (needs the text encoder)."""
        if classes is None:
            return super().predict(images, batch_size, return_dict)
        saved = self._classes, self.labels
        self.set_classes(classes)
        try:
            return super().predict(images, batch_size, return_dict)
        finally:
            self._classes, self.labels = saved


class PromptedKind(ImageKind):
    name = "prompted-classification"
    predictor = PromptedPredictor
    run_extras = ("text",)

    # -- build side ---------------------------------------------------------------
    def export_request(self, spec, preprocess, options):
        unknown = [k for k in options if k not in EXPORT_OPTIONS]
        if unknown:
            raise UsageError(f"{', '.join(unknown)} do not apply to {spec.id}",
                             "its export options: --text-encoder FOLDER, --with-text-encoder, --classes")
        build = {}
        if options.get("text_encoder"):
            build["text_encoder"] = str(options["text_encoder"])
        if options.get("with_text_encoder"):
            build["with_text_encoder"] = True
        if options.get("classes"):
            build["class_texts"] = list(options["classes"])
        return dict(preprocess), [i.to_dict() for i in spec.inputs_for(build)], build

    def model_request(self, spec, pre, model):
        """The class embeddings are made now (from the text folder), and the tokenizer facts
        the device needs to embed new names."""
        facts = model.text_preprocess()
        return ({**pre, "text": facts} if facts else pre), {}

    def graph_feeds(self, role, samples, upstream, seed, purpose, model=None):
        if role != "text":
            raise ExportError(f"{self.name} has no graph '{role}'")
        return model.text_feeds(len(samples))

    def pipeline_reference(self, run_torch, pre, seed):
        return super().pipeline_reference(lambda batch: run_torch("model", {"pixel_values": batch}), pre, seed)

    def pipeline_check(self, run, stored, pre, gate):
        return super().pipeline_check(lambda batch: run("model", {"pixel_values": batch}), stored, pre, gate)

    # -- parity -------------------------------------------------------------------
    def compare_outputs(self, reference, candidate, gates):
        """Cosine of the embeddings (gated); for the logits, top-1 agreement (gated), the
        largest probability difference and the cosine of the logits minus their row mean
        (recorded). A cosine head's logits differ between classes by little on some inputs,
        so a cosine gate on them would judge noise that never changes a probability."""
        others = [k for k in reference if k != "logits"]
        result = compare({k: reference[k] for k in others}, {k: candidate[k] for k in others if k in candidate},
                         gates)
        if "logits" not in reference:
            return result
        if "logits" not in candidate:
            result["failures"].append("output 'logits' missing")
            return result
        ref, got = np.asarray(reference["logits"], np.float64), np.asarray(candidate["logits"], np.float64)
        top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
        centred = cosine_rows(ref - ref.mean(1, keepdims=True), got - got.mean(1, keepdims=True))
        result["outputs"]["logits"] = {"top1_agreement": top1, "centred_cosine_min": float(centred.min()),
                                       "probability_max_abs": float(np.abs(softmax(ref) - softmax(got)).max()),
                                       "max_abs": float(np.abs(ref - got).max())}
        if top1 < gates["top1_agreement"]:
            result["failures"].append(f"logits: top-1 agreement {top1:.3f} < {gates['top1_agreement']}")
        return result

    # -- CLI ----------------------------------------------------------------------
    def add_cli_arguments(self, parser):
        """The image kind's arguments are already there (one predict parser for all kinds); so
        may `--classes` be (MedLSAM's label values): one flag, read by each kind its way."""
        help_text = ("prompted classifiers: comma list of class names instead of the exported ones (bundles "
                     "exported --with-text-encoder)")
        if "--classes" in parser._option_string_actions:
            action = parser._option_string_actions["--classes"]
            action.help = f"{action.help}; {help_text}"
        else:
            parser.add_argument("--classes", help=help_text)
        parser.add_argument("--plot", metavar="PNG", help="a bar chart of the class probabilities (one per input: "
                            "NAME.png, NAME-1.png, ...)")

    def cli_predict(self, p, args, ui) -> int:
        if getattr(args, "classes", None):
            p.set_classes([c.strip() for c in args.classes.split(",")])
        if getattr(args, "plot", None):  # pictures first: a bad --plot name fails before the run
            from ..pictures import write_bar_chart
            paths = [_numbered(args.plot, i) for i in range(len(args.inputs))]
            outputs = p.predict(args.inputs, batch_size=args.batch_size or 8, return_dict=True)
            for i, path in enumerate(paths):
                write_bar_chart(path, p.labels, outputs["probabilities"][i], str(args.inputs[i]), args.overwrite)
                ui.err.print(f"wrote {path}")
        return super().cli_predict(p, args, ui)


def _numbered(path: str, i: int):
    from pathlib import Path
    path = Path(path)
    return path if i == 0 else path.with_name(f"{path.stem}-{i}{path.suffix}")


KIND = PromptedKind()
__all__ = ["KIND", "PromptedPredictor"]
