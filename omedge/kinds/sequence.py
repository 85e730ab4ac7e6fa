"""Sequence kind: protein token sequences in (PRIME / TemPL). The LM head gives
per-position log-probabilities, scored as zero-shot mutation effects; the OGT head
gives one temperature per sequence.

Parity: Spearman of every single-substitution score against torch fp32 (what users
rank mutants by), the per-position log-prob error, and the OGT error in degrees C.
"""
from __future__ import annotations

import json

import numpy as np

from ..errors import InputError
from ..io import protein
from ..parity import compare, spearman
from ..runtime.predictor import Predictor
from .base import Kind

GATES = {  # per gate class: mutation-score Spearman, log-prob cosine, OGT error (degrees C)
    "fp32": {"spearman_min": 0.999, "cosine_min": 0.9999, "ogt_abs_max": 0.05},
    "fp16": {"spearman_min": 0.995, "cosine_min": 0.999, "ogt_abs_max": 0.25},
    "bf16": {"spearman_min": 0.99, "cosine_min": 0.999, "ogt_abs_max": 0.5},
    "int8": {"spearman_min": 0.99, "cosine_min": 0.99, "ogt_abs_max": 0.5},
}
CALIBRATION_LENGTH = 512   # residues per calibration sequence: longer ones are cropped


class SequencePredictor(Predictor):
    @property
    def window(self) -> int:
        """Residues one pass takes (the model's token limit less cls and eos)."""
        return int(self.manifest.preprocess["max_length"]) - 2

    def _ids(self, sequence: str, ambiguous: str) -> np.ndarray:
        ids = protein.check_token_ids(protein.encode(sequence, ambiguous))
        rows = int(self.manifest.preprocess.get("embedding_rows", protein.EMBEDDING_ROWS))
        if ids.max() >= rows:  # never send an id past the embedding table to a backend
            raise InputError(f"token id {int(ids.max())} is past the model's {rows}-row embedding")
        return ids[None]

    def log_probs(self, sequence: str, ambiguous: str = "refuse") -> np.ndarray:
        """(len + 2, 33) log-probabilities of one sequence (rows 0 and -1 are cls and eos)."""
        if len(sequence) > self.window:
            raise InputError(f"the sequence has {len(sequence)} residues; one pass takes {self.window}",
                             "score mutations with score(), which crops to the window covering most of them")
        return self.run({"input_ids": self._ids(sequence, ambiguous)}, batch_size=1)["log_probs"][0]

    def score(self, sequence: str, mutations, ambiguous: str = "refuse") -> list[dict]:
        """Zero-shot score of each mutant: log p(mut) - log p(wt) from one pass on the wild
        type (a multi-mutant sums its singles, an omedge extension). mutations: a CSV
        path, a mutant string such as "A23G" or "A23G:L45K", or a list of them."""
        sequence = _one_sequence(sequence)
        rows = protein.parse_mutations(mutations)
        protein.check_mutations(sequence, rows)
        positions = [m.pos for r in rows for m in r.mutations]
        start, end = protein.crop_window(len(sequence), positions, self.window)
        lp = self.run({"input_ids": self._ids(sequence[start:end], ambiguous)}, batch_size=1)["log_probs"][0]
        scores = protein.score_mutants(lp, sequence, rows, start=start)
        return [{"mutant": r.text, "score": float(s), "positions": [m.pos for m in r.mutations],
                 "wild_type_check": "ok", **r.extra} for r, s in zip(rows, scores)]

    def predict(self, sequences, ambiguous: str = "refuse") -> np.ndarray | list:
        """OGT bundles: degrees C per sequence. LM bundles: a (len + 2, 33) array each."""
        records = protein.read_fasta(sequences) if isinstance(sequences, str) else \
            [(f"sequence_{i}", s) for i, s in enumerate(sequences)]
        if self.manifest.primary_output == "log_probs":
            return [self.log_probs(s, ambiguous) for _, s in records]
        out = []
        for _, seq in records:
            if len(seq) > self.window:
                raise InputError(f"a sequence has {len(seq)} residues; the model takes {self.window}")
            out.append(self.run({"input_ids": self._ids(seq, ambiguous)}, batch_size=1)["ogt"][0])
        return np.asarray(out, np.float32)


def _one_sequence(sequence) -> str:
    records = protein.read_fasta(sequence)
    if len(records) != 1:
        raise InputError(f"give one wild-type sequence, got {len(records)} FASTA records",
                         "put the wild type alone in its FASTA file")
    return records[0][1]


class SequenceKind(Kind):
    name = "sequence"
    predictor = SequencePredictor
    store_float16 = False   # token ids are stored as they are

    def folder_samples(self, source, pre, limit, name="input_ids"):
        """Calibration from a FASTA file (or a folder of them): one sample per record."""
        from pathlib import Path
        files = sorted(Path(source).glob("*.fa*")) if Path(source).is_dir() else [source]
        records = [r for f in files for r in protein.read_fasta(f)][:limit or None]
        feeds = [{name: protein.encode(seq[:CALIBRATION_LENGTH], "x")[None]} for _, seq in records]
        return feeds, [n for n, _ in records]

    def synthetic_samples(self, n, seed, pre, name="input_ids"):
        """Random proteins with natural residue frequencies, 48-160 residues."""
        rng = np.random.default_rng(seed)
        freq = np.array([9.9, 8.3, 7.1, 6.9, 6.6, 6.8, 5.5, 5.3, 5.9, 5.5, 4.7, 5.8, 3.9, 4.1,
                         3.9, 2.9, 2.4, 2.3, 1.1, 1.4])
        return [{name: np.concatenate([[0], rng.choice(np.arange(4, 24), int(rng.integers(48, 161)),
                                                     p=freq / freq.sum()), [2]]).astype(np.int64)[None]}
                for _ in range(n)]

    def parity(self, reference, candidate, gate, overrides, inputs):
        gates = {**GATES[gate], **overrides.get(gate, {})}
        result = {"gates": gates, "outputs": {}, "failures": []}
        if "log_probs" in reference[0]:
            rho, err = [], []
            for ref, got, feed in zip(reference, candidate, inputs):
                r, g, ids = ref["log_probs"][0], np.asarray(got["log_probs"])[0], feed["input_ids"][0]
                if r.shape != g.shape or not np.isfinite(g).all():
                    result["failures"].append(f"log_probs: shape {g.shape} or non-finite values")
                    continue
                rho.append(spearman(_all_singles(r, ids), _all_singles(g, ids)))
                err.append(float(np.abs(r[1:-1, 4:24] - g[1:-1, 4:24]).max()))
            cos = compare({"log_probs": np.concatenate([x["log_probs"][0] for x in reference])},
                          {"log_probs": np.concatenate([np.asarray(x["log_probs"])[0] for x in candidate])}, gates)
            result["outputs"]["log_probs"] = {**cos["outputs"].get("log_probs", {}), "spearman_min": min(rho or [0]),
                                              "logprob_max_abs_error": max(err or [float("inf")])}
            result["failures"] += cos["failures"]
            if min(rho or [0]) < gates["spearman_min"]:
                result["failures"].append(f"mutation-score Spearman {min(rho or [0]):.4f} < {gates['spearman_min']}")
        if "ogt" in reference[0]:
            err = float(max(np.abs(r["ogt"] - np.asarray(g["ogt"])).max() for r, g in zip(reference, candidate)))
            result["outputs"]["ogt"] = {"abs_error_max_c": err}
            if not err <= gates["ogt_abs_max"]:
                result["failures"].append(f"OGT error {err:.3f} C > {gates['ogt_abs_max']} C")
        result["passed"] = not result["failures"]
        return result

    # -- serving ------------------------------------------------------------------
    raw_input = "sequence"

    def decode_raw(self, p, items, config):
        """Protein sequences as BYTES (one-letter codes; B/U/Z/O refused, as predict does),
        each within one pass's window; several in one request must be of equal length."""
        seqs = []
        for i, b in enumerate(items):
            try:
                seq = b.decode("ascii").strip()
            except UnicodeDecodeError:
                raise InputError(f"sequence[{i}] is not ASCII one-letter amino-acid codes") from None
            if len(seq) > p.window:
                raise InputError(f"sequence[{i}] has {len(seq)} residues; one pass takes {p.window}")
            seqs.append(seq)
        if len({len(s) for s in seqs}) > 1:
            raise InputError(f"sequences of different lengths {sorted({len(s) for s in seqs})} in one request",
                             "send one sequence per request (or sequences of equal length)")
        return {"input_ids": np.concatenate([p._ids(s, "refuse") for s in seqs])}

    def decode_request(self, p, tensors, config):
        feeds = super().decode_request(p, tensors, config)
        protein.check_token_ids(feeds["input_ids"])   # never an id past the embedding table
        return feeds

    def add_cli_arguments(self, parser):
        parser.add_argument("--sequence", help="sequence models: a FASTA file or a sequence (the wild type)")
        parser.add_argument("--mutations", help="sequence models: a CSV of mutants (column 'mutant') or 'A23G,...'")
        parser.add_argument("--ambiguous", choices=["refuse", "x"], default="refuse",
                            help="sequence models: B/U/Z/O letters are refused, or read as X")

    def cli_predict(self, p, args, ui) -> int:
        source = args.sequence or (args.inputs[0] if len(args.inputs) == 1 else None)
        if source is None:
            raise InputError("give the sequence: --sequence FILE.fasta (or one sequence as the input)")
        if args.mutations:
            muts = args.mutations if "," not in args.mutations else [m.strip() for m in args.mutations.split(",")]
            results = p.score(source, muts, args.ambiguous)
            columns, rows = ["mutant", "score", "positions"], [(r["mutant"], f"{r['score']:.4f}", r["positions"])
                                                               for r in results]
        elif p.manifest.primary_output == "ogt":
            records = protein.read_fasta(source)
            temps = p.predict([s for _, s in records], args.ambiguous)
            results = [{"name": n, "length": len(s), "ogt_c": float(t)} for (n, s), t in zip(records, temps)]
            columns, rows = ["sequence", "length", "OGT C"], [(r["name"], r["length"], f"{r['ogt_c']:.2f}")
                                                             for r in results]
        else:
            raise InputError("this bundle scores mutations: add --mutations CSV (or 'A23G,L45K')")
        if args.json:
            print(json.dumps({"runtime": p.describe(), "results": results}, indent=2))
            return 0
        ui.runtime_line(p)
        ui.table(f"{p.manifest.model['id']}: {len(results)} results", columns, rows)
        return 0


def _all_singles(log_probs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Every single-substitution score of a sequence: log p_i(a) - log p_i(wt_i) for the
    20 residues a at every residue position i (what a deep mutational scan ranks)."""
    lp = log_probs[1:-1].astype(np.float64)
    wt = lp[np.arange(len(lp)), ids[1:-1]]
    return (lp[:, 4:24] - wt[:, None]).ravel()


KIND = SequenceKind()
