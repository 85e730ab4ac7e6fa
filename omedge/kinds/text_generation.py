"""Text-generation kind: a GGUF LLM on llama.cpp (PULSE). The prompt format comes from
the manifest, streaming answers, and a history that stays inside the context window."""
from __future__ import annotations

import codecs
import json
from collections.abc import Iterator

import numpy as np

from ..errors import BackendUnavailableError, InputError
from ..runtime.backends import backend_class
from ..runtime.predictor import DEVICES, open_bundle
from .base import Kind


def prompt_segments(fmt: dict, messages: list[dict], mode: str | None = None) -> list[str]:
    """The complete segments of a conversation (each followed by the EOS id): the system
    text, then 'User: ...' / 'Helper: ...' turns; `mode` prefixes the first question."""
    if mode is not None and mode not in fmt["modes"]:
        raise InputError(f"unknown prompt mode '{mode}'", f"choose {', '.join(fmt['modes'])}")
    segments, first_user = [fmt["system"]], True
    for m in messages:
        if m.get("role") == "user":
            prefix = fmt["modes"][mode] if (first_user and mode) else ""
            first_user = False
            segments.append(f"{fmt['user']}{prefix}{m['content']}")
        elif m.get("role") == "assistant":
            segments.append(f"{fmt['assistant']}{m['content']}")
    return segments


class LLMPredictor:
    """load() arguments: device (auto, cpu, cuda), backend (auto or llama.cpp), threads,
    artifact; mode "latency" only (llama.cpp answers one request at a time)."""

    def __init__(self, bundle, device="auto", backend="auto", threads=None, artifact=None, mode="latency",
                 n_ctx: int | None = None, logits_all: bool = False):
        from ..runtime.plan import plan
        if device not in DEVICES or device in ("gpu", "npu"):
            raise BackendUnavailableError(f"an LLM bundle cannot run on device={device!r}",
                                          "llama.cpp bundles run on device auto, cpu or cuda")
        if backend not in ("auto", "llama.cpp"):
            raise BackendUnavailableError(f"an LLM bundle cannot run on backend={backend!r}",
                                          "GGUF bundles run on llama.cpp only: backend auto or llama.cpp")
        if mode != "latency":
            raise InputError(f"an LLM bundle has no mode={mode!r}",
                             "llama.cpp serves one request at a time: use mode='latency'")
        self.path, self.manifest = open_bundle(bundle)
        arts = [a for a in self.manifest.artifacts if artifact is None or a.name == artifact]
        if not arts:
            raise InputError(f"bundle has no artifact '{artifact}'",
                             f"it has: {', '.join(a.name for a in self.manifest.artifacts)}")
        candidates, self.skipped = plan(arts, device, "llama.cpp")
        candidates = [c for c in candidates if c[2] in ("cuda", "cpu")]
        if not candidates:
            raise BackendUnavailableError(f"llama.cpp cannot run {self.path.name} on device={device}",
                                          "; ".join(self.skipped))
        self.artifact, _, dev = candidates[0]
        llm = self.manifest.extra["llm"]
        self.n_ctx = n_ctx or llm["context_length"]
        from ..bundle import bundle_file
        self.backend = backend_class("llama.cpp")({"model": bundle_file(self.path, self.artifact.entry, self.manifest)},
                                                 dev, {"threads": threads, "n_ctx": self.n_ctx, "logits_all": logits_all})
        self.arch, self.prompt, self.sampling = llm["arch"], llm["prompt"], dict(llm["sampling"])
        self.eos = self.backend.eos()

    # -- tokens -------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """One segment, tokenised as the official demo does: with a BOS for the Llama
        (20b) tokenizer's default, without for BLOOM (7b)."""
        return self.backend.tokenize(text, add_bos=self.arch == "llama")

    def prompt_tokens(self, messages: list[dict], mode: str | None = None) -> list[int]:
        tokens = []
        for seg in prompt_segments(self.prompt, messages, mode):
            tokens += self.tokenize(seg) + [self.eos]
        return tokens + self.tokenize(self.prompt["primer"])[:1]

    def _fit(self, messages: list[dict], mode, max_tokens: int) -> list[int]:
        """Drop the oldest turns until prompt + answer fit the context window."""
        messages = list(messages)
        while True:
            tokens = self.prompt_tokens(messages, mode)
            if len(tokens) + max_tokens <= self.n_ctx:
                return tokens
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if len(users) <= 1:
                raise InputError(f"the prompt is {len(tokens)} tokens; with max_tokens={max_tokens} it does not fit "
                                 f"the {self.n_ctx}-token context", "shorten the question or lower max_tokens")
            messages = messages[users[1]:]

    # -- generation ---------------------------------------------------------------
    def _stream(self, tokens: list[int], max_tokens: int, sampling: dict) -> Iterator[str]:
        """Text pieces as tokens arrive. Per token only that token's bytes are decoded
        (incrementally: a byte-level BPE token may end mid-character), the answer-marker
        check stops once the start is settled, and no token is decoded past max_tokens."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text, emitted, n = decoder.decode(self.backend.detokenize(tokens[-1:])), 0, 0
        marker = self.prompt["primer"].strip()
        start, settled = None, False
        gen = self.backend.generate(tokens, sampling)
        try:
            for tok in gen:
                if tok == self.eos:
                    break
                n += 1
                text += decoder.decode(self.backend.detokenize([tok]))
                if not settled:  # later text cannot move a start found after this many characters
                    start = _answer_start(text, marker)
                    settled = start is not None and len(text.lstrip()) > len(marker) + 3
                if start is not None and len(text) > max(start, emitted):
                    piece = text[max(start, emitted):]
                    emitted = len(text)
                    yield piece
                if n >= max_tokens:
                    break
        finally:
            gen.close()

    def generate(self, prompt: str, max_tokens: int = 256, stream: bool = False, mode: str | None = None,
                 **sampling):
        """Answer one question in the model's conversation format."""
        return self.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=stream,
                         mode=mode, **sampling)

    def chat(self, messages: list[dict], max_tokens: int = 256, stream: bool = False, mode: str | None = None,
             **sampling):
        if not messages or messages[-1].get("role") != "user":
            raise InputError("chat needs a list of messages ending with a user turn")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        pieces = self._stream(self._fit(messages, mode, max_tokens), max_tokens,
                              {**self.sampling, **check_sampling(sampling)})
        return pieces if stream else "".join(pieces).strip()

    def predict(self, prompts, max_tokens: int = 256, **sampling) -> list[str]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return [self.generate(p, max_tokens=max_tokens, **sampling) for p in prompts]

    def describe(self) -> dict:
        m = self.manifest
        return {"bundle": str(self.path), "model": m.model["id"], "kind": m.kind, "weights": m.weights["source"],
                "artifact": self.artifact.name, "format": "gguf", "precision": self.artifact.precision,
                **self.backend.describe(), "parity": self.artifact.parity.get("passed"), "skipped": self.skipped}


SAMPLING = {"temperature": "0 = greedy", "top_k": "0 = off, 1 = greedy", "top_p": "in (0, 1]",
            "seed": "an integer below 2**32 - 1: the same seed, the same answer", "repeat_penalty": "> 0, 1 = off"}


def check_sampling(sampling: dict) -> dict:
    """The caller's sampling options, refused when unknown or out of range: a typo such
    as `temprature=0` would otherwise be ignored and the answer silently sampled."""
    unknown = sorted(set(sampling) - set(SAMPLING))
    if unknown:
        raise InputError(f"unknown sampling option {', '.join(unknown)}",
                         "options: " + "; ".join(f"{k} ({v})" for k, v in SAMPLING.items()))
    for key, value in sampling.items():
        if value is None and key == "seed":
            continue
        integer = key in ("top_k", "seed")
        ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
        ok = ok and {"temperature": lambda v: v >= 0, "top_k": lambda v: v >= 0, "top_p": lambda v: 0 < v <= 1,
                     "seed": lambda v: 0 <= v < 0xFFFFFFFF, "repeat_penalty": lambda v: v > 0}[key](value)
        if not ok:
            raise InputError(f"sampling option {key}={value!r} is out of range", f"{key}: {SAMPLING[key]}")
    return dict(sampling)


def _answer_start(text: str, marker: str) -> int | None:
    """Where the answer begins after the model's own "Helper:" marker, or None while
    the text could still be that marker."""
    stripped = text.lstrip()
    offset = len(text) - len(stripped)
    if stripped.startswith("<s>"):
        stripped, offset = stripped[3:], offset + 3
    if stripped.startswith(marker):
        rest = stripped[len(marker):]
        if not rest:
            return None
        return offset + len(marker) + (1 if rest.startswith(" ") else 0)
    if marker.startswith(stripped):
        return None
    return offset


class TextGenerationKind(Kind):
    name = "text-generation"
    predictor = LLMPredictor
    serves_oip = False   # served on the OpenAI chat-completions API (omedge.serve.openai_api)
    serves_chat = True

    def serve_inputs(self, manifest):
        return []

    def serve_outputs(self, manifest):
        return []

    def decode_request(self, predictor, tensors, config):
        raise InputError("LLM bundles are served on the OpenAI API, not OIP infer",
                         "POST /v1/chat/completions (see GET /v1/models)")

    def add_cli_arguments(self, parser):
        parser.add_argument("--max-tokens", type=int, default=256, help="LLM bundles: answer length limit")
        parser.add_argument("--prompt-mode", "--mode", dest="prompt_mode", choices=["qa", "consultation"],
                            help="LLM bundles: PULSE's question prefix")

    def cli_predict(self, p, args, ui) -> int:
        results = [{"prompt": q, "answer": p.generate(q, max_tokens=args.max_tokens, mode=args.prompt_mode)}
                   for q in args.inputs]
        if args.json:
            print(json.dumps({"runtime": p.describe(), "results": results}, ensure_ascii=False, indent=2))
        else:
            for r in results:
                ui.out.print(f"[bold]{r['prompt']}[/bold]\n{r['answer']}\n")
        return 0

    def verify(self, p, stored, manifest) -> dict:
        """Re-run the stored prompt ids; compare the argmax and the reference's top-8 logits."""
        ids, offsets = stored["ids"], stored["offsets"]
        agree, errs = [], []
        for i in range(len(offsets) - 1):
            seq = ids[offsets[i]:offsets[i + 1]].tolist()
            logits = p.backend.logits(seq)
            top_ids = stored["top_ids"][offsets[i]:offsets[i + 1]]
            agree.append(logits.argmax(-1) == top_ids[:, 0])
            errs.append(np.abs(np.take_along_axis(logits, top_ids, -1) - stored["top_logits"][offsets[i]:offsets[i + 1]]))
        gate = p.artifact.parity["gate"]["min"]
        agreement = float(np.concatenate(agree).mean())
        failures = [] if agreement >= gate else [f"argmax agreement {agreement:.4f} < {gate}"]
        return {"argmax_agreement": agreement, "top8_logit_max_abs": float(np.concatenate(errs).max()),
                "gate": gate, "failures": failures, "passed": not failures}

    def verify_options(self, stored) -> dict:
        return {"n_ctx": int(np.diff(stored["offsets"]).max()) + 8, "logits_all": True}


KIND = TextGenerationKind()
