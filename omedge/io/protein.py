"""Protein sequences in (FASTA), token ids out, mutation lists in, zero-shot scores out.

PRIME (an ESM-2 clone) reads ESM-2's alphabet, but its embedding has only 25 rows: ids
25..32 (B U Z O . - <null_1> <mask>) index past it. onnxruntime refuses such a Gather and
OpenVINO may silently return zeros, so nothing here ever produces an id >= 25. The 33
log-prob columns the model returns still follow the full alphabet.
"""
from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

RESIDUES = "LAGVSERTIDPKQNFYMHWC"          # ids 4..23, ESM-2 order
STANDARD = frozenset(RESIDUES)
AMBIGUOUS = {"B": "D or N", "U": "selenocysteine", "Z": "E or Q", "O": "pyrrolysine"}
ALPHABET = ("<cls>", "<pad>", "<eos>", "<unk>", *RESIDUES, "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>")
TOKEN_IDS = {tok: i for i, tok in enumerate(ALPHABET)}
CLS, PAD, EOS, UNK, X_ID = 0, 1, 2, 3, 24
EMBEDDING_ROWS = 25                        # PRIME's embedding: no id >= 25 may reach a backend
FASTA_SUFFIXES = {".fasta", ".fa", ".faa", ".fas", ".seq"}
CSV_SUFFIXES = {".csv", ".tsv", ".tab", ".txt"}
log = logging.getLogger("omedge.protein")


_HINTS = {"-": "this looks like an alignment row: give the ungapped wild-type sequence (remove '-' and '.')",
          "*": "'*' (a stop codon) is allowed only as the last character; cut the sequence at the first stop",
          "0": "remove the numbering: give one-letter residue codes only"}
_HINTS["."] = _HINTS["-"]


def _illegal(where: str, pos: int, ch: str) -> InputError:
    """One message for every refused character: where, which, and what to do."""
    if ch in AMBIGUOUS:
        return InputError(f"{where}: residue {pos} is {ch} ({AMBIGUOUS[ch]}), which PRIME has no token for",
                          "pass ambiguous='x' to read B, U, Z and O as X (unknown), or replace it with a "
                          "standard residue" + (" (an RNA sequence must be translated first)" if ch == "U" else ""))
    key = "0" if ch.isdigit() else ch
    return InputError(f"{where}: illegal character {ch!r} at position {pos}",
                      _HINTS.get(key, "use one-letter amino-acid codes: the 20 standard residues, X for unknown"))


def _clean(seq: str, where: str, allow_ambiguous: bool) -> str:
    """Upper-cased residues, or the first refused character. Only ASCII is upper-cased:
    str.upper() would turn a stray 'ß' into 'SS' and shift every position after it."""
    seq = "".join(seq.split())
    ok = STANDARD | {"X"} | (set(AMBIGUOUS) if allow_ambiguous else set())
    for i, ch in enumerate(seq):
        if not (ch.isascii() and ch.upper() in ok):
            raise _illegal(where, i + 1, ch)
    return seq.upper()


def _is_file(source, suffixes) -> bool:
    """A Path, or a string that names a file (or has a file suffix, so a typo is not read as a sequence)."""
    if isinstance(source, Path):
        return True
    if "\n" in source or source.lstrip().startswith(">"):
        return False
    try:
        return Path(source).suffix.lower() in suffixes or Path(source).is_file()
    except (OSError, ValueError):  # a long sequence is not a valid file name
        return False


def read_fasta(path_or_text: str | Path) -> list[tuple[str, str]]:
    """(name, sequence) records from a FASTA file or text, or one bare sequence (named "sequence").

    Lower case (soft-masking) is upper-cased and whitespace removed; a single trailing '*'
    (stop codon) is dropped. B/U/Z/O are kept here: `encode` decides what to do with them.
    """
    source = path_or_text
    if _is_file(source, FASTA_SUFFIXES):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"FASTA file not found: {path}", "give a path to a FASTA file or the sequence itself")
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    else:
        text = str(source)
    records: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(">"):
            records.append((line[1:].strip() or f"record {len(records) + 1}", []))
        elif line and not line.startswith(";"):
            if not records:
                records.append(("sequence", []))
            records[-1][1].append(line)
    if not records:
        raise InputError("no sequence found: the input is empty", "a FASTA record is a '>name' line and the sequence")
    out = []
    for name, lines in records:
        seq = "".join(lines)
        seq = seq[:-1] if seq.endswith("*") else seq
        if not seq:
            raise InputError(f"FASTA record {name!r} has an empty sequence", "give the residues below its '>' line")
        out.append((name, _clean(seq, f"record {name!r}", allow_ambiguous=True)))
    return out


def check_token_ids(ids: np.ndarray) -> np.ndarray:
    """Refuse any id outside PRIME's 25-row embedding: a backend could fail or silently read zeros."""
    bad = ids[(ids < 0) | (ids >= EMBEDDING_ROWS)]
    if bad.size:
        raise InputError(f"token id {int(bad[0])} is outside PRIME's {EMBEDDING_ROWS}-row embedding",
                         "this is an omedge bug: please report it with the input sequence")
    return ids


def encode(sequence: str, ambiguous: str = "refuse", name: str = "sequence") -> np.ndarray:
    """int64 ids [cls] + residues + [eos], shape (n + 2,): the row for residue i (0-based) is i + 1.

    ambiguous="refuse" raises on B/U/Z/O; ambiguous="x" maps all four to X (24), with a
    warning: guessing D/E for B/Z would invent a residue the sequence does not state.
    """
    if ambiguous not in ("refuse", "x"):
        raise InputError(f"ambiguous={ambiguous!r} is not an option", "use 'refuse' (default) or 'x'")
    seq = _clean(str(sequence), name, allow_ambiguous=ambiguous == "x")
    if not seq:
        raise InputError(f"{name}: the sequence is empty", "give at least one residue")
    mapped = [f"{c}{i + 1}" for i, c in enumerate(seq) if c in AMBIGUOUS]
    if mapped:
        log.warning("%s: read %d ambiguous residue(s) as X: %s", name, len(mapped), ", ".join(mapped[:10]))
    ids = np.fromiter((X_ID if c in AMBIGUOUS else TOKEN_IDS[c] for c in seq), np.int64, len(seq))
    return check_token_ids(np.concatenate([[CLS], ids, [EOS]]).astype(np.int64))


@dataclass(frozen=True)
class Mutation:
    wt: str
    pos: int  # 1-based residue number
    mt: str

    def __str__(self) -> str:
        return f"{self.wt}{self.pos}{self.mt}"


@dataclass
class MutantRow:
    """One mutant as given: its text, its substitutions (empty = wild type) and the other CSV columns."""
    text: str
    mutations: tuple[Mutation, ...]
    extra: dict = field(default_factory=dict)


_MUT = re.compile(r"([A-Za-z])(\d+)([A-Za-z])")


def parse_mutant(text: str, where: str = "") -> tuple[Mutation, ...]:
    """'A23G' or 'A23G:L45K' (ProteinGym's ':', or ';') -> substitutions; 'wt' -> ()."""
    t = str(text).strip()
    if t.lower() == "wt":
        return ()
    muts = []
    for part in re.split(r"[:;]", t):
        m = _MUT.fullmatch(part.strip())
        if not m:
            raise InputError(f"{where}cannot read the mutation {t!r}",
                             "write substitutions as wild-type letter, 1-based position, mutant letter (A23G); "
                             "join those of one multi-mutant with ':' (A23G:L45K); 'wt' is the wild type")
        muts.append(Mutation(m[1].upper(), int(m[2]), m[3].upper()))
    if len({m.pos for m in muts}) < len(muts):
        raise InputError(f"{where}the mutant {t!r} changes one position twice", "give each position once")
    return tuple(muts)


def _is_mutant(text: str) -> bool:
    try:
        parse_mutant(text)
        return True
    except InputError:
        return False


def _read_mutation_csv(path: Path) -> list[MutantRow]:
    if not path.is_file():
        raise InputError(f"mutation file not found: {path}", "give a CSV with a 'mutant' column, or the mutations")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        rows = [(reader.line_num, [c.strip() for c in cells]) for cells in reader if any(c.strip() for c in cells)]
    if not rows:
        raise InputError(f"{path.name} is empty", "give one mutant per row, e.g. a 'mutant' column with A23G")
    first = rows[0][1]
    named = [i for i, c in enumerate(first) if c.lower() in ("mutant", "mutation", "mutants", "mutations")]
    col = named[0] if named else 0
    header = first if named or not _is_mutant(first[0]) else None   # a first row that is no mutant: header
    body = rows[1:] if header is not None else rows
    if not body:
        raise InputError(f"{path.name} has a header but no mutants", "add one mutant per row below the header")
    names = header or []
    out = []
    for line, cells in body:
        key = [names[i] if i < len(names) and names[i] else f"column{i + 1}" for i in range(len(cells))]
        text = cells[col] if col < len(cells) else ""
        muts = parse_mutant(text, where=f"{path.name} line {line}: ")
        out.append(MutantRow(text, muts, {key[i]: cells[i] for i in range(len(cells)) if i != col}))
    return out


def parse_mutations(spec) -> list[MutantRow]:
    """Mutants from a CSV/TSV path (column 'mutant'/'mutation', else the first; other columns kept
    in `extra`), one string ("A23G:L45K", "wt"), or a list of strings."""
    if isinstance(spec, (str, Path)) and _is_file(spec, CSV_SUFFIXES):
        return _read_mutation_csv(Path(spec))
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise InputError("no mutations given", "give mutations like A23G, a list of them, or a CSV file")
    return [MutantRow(str(t).strip(), parse_mutant(t, where=f"mutant {i + 1}: " if len(items) > 1 else ""))
            for i, t in enumerate(items)]


def _unpack(item) -> tuple[str, tuple[Mutation, ...]]:
    """(label, substitutions) of a MutantRow, a mutant string, a Mutation or a sequence of them."""
    if isinstance(item, MutantRow):
        return item.text, item.mutations
    if isinstance(item, str):
        return item.strip(), parse_mutant(item)
    muts = (item,) if isinstance(item, Mutation) else tuple(item)
    return ":".join(map(str, muts)) or "wt", muts


def check_mutations(sequence: str, mutants) -> None:
    """Refuse a position outside the sequence, a wild-type letter the sequence does not have,
    or a mutant letter that is not a standard residue (the official code only warns)."""
    seq, problems = str(sequence).upper(), []
    n = len(seq)
    for item in mutants:
        label, muts = _unpack(item)
        for m in muts:
            if not 1 <= m.pos <= n:
                problems.append((f"mutation {label}: position {m.pos} is outside the sequence (length {n})",
                                 "positions are 1-based (the first residue is 1) and count the FASTA's residues"))
            elif seq[m.pos - 1] != m.wt:
                problems.append((f"mutation {label}: position {m.pos} is {seq[m.pos - 1]} in the sequence, "
                                 f"not {m.wt}", "check the numbering is 1-based and the FASTA is the wild type"))
            elif m.wt in AMBIGUOUS:
                problems.append((f"mutation {label}: position {m.pos} is the ambiguous residue {m.wt}, "
                                 "which PRIME reads as X", "write the residue you mean in the FASTA, "
                                 "or leave this position out"))
            elif m.mt not in STANDARD:
                problems.append((f"mutation {label}: the mutant residue {m.mt} is not a standard amino acid",
                                 "the mutant must be one of ACDEFGHIKLMNPQRSTVWY"))
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise InputError(problems[0][0] + more, problems[0][1])


def crop_window(length: int, positions, window: int) -> tuple[int, int]:
    """0-based [start, end) of the `window`-residue crop that covers the most positions.

    `window` counts residues: a model taking at most T tokens (cls + residues + eos) has
    window = T - 2. Each entry of `positions` (1-based) counts once, so pass a position once
    per mutation to favour the most mutants. Among equal counts the tightest group wins and
    the window is centred on it, then clamped to the sequence. Positions left outside are
    the caller's to report. No positions: the first window.
    """
    if window < 1:
        raise InputError(f"crop window of {window} residues", "the window must hold at least one residue")
    if length <= window:
        return 0, length
    q = np.sort(np.asarray([p - 1 for p in positions if 1 <= p <= length], dtype=np.int64))
    if q.size == 0:
        return 0, window
    ends = np.searchsorted(q, q + window, side="left")     # exclusive end of each group
    counts = ends - np.arange(q.size)
    cand = np.flatnonzero(counts == counts.max())
    i = cand[np.argmin(q[ends[cand] - 1] - q[cand])]
    lo, hi = int(q[i]), int(q[ends[i] - 1])
    start = min(max((lo + hi + 1 - window) // 2, 0), length - window)
    return start, start + window


def score_mutants(log_probs: np.ndarray, sequence: str, mutants, start: int = 0) -> np.ndarray:
    """log p_pos(mt) - log p_pos(wt) per mutant from ONE wild-type pass (float64, one per mutant).

    log_probs: (tokens, 33) for the encoded crop sequence[start:start + tokens - 2]; residue
    pos (1-based) is row pos - start. Raw logits give the same scores (log_softmax only
    subtracts a per-row constant). 'wt' scores 0.0. A multi-mutant is the SUM of its single
    scores: an omedge extension (the official score_mutant accepts one substitution).
    """
    lp = np.asarray(log_probs)
    lp = lp[0] if lp.ndim == 3 and lp.shape[0] == 1 else lp
    if lp.ndim != 2 or lp.shape[1] != len(ALPHABET):
        raise InputError(f"log-probs of shape {lp.shape}; expected (tokens, {len(ALPHABET)})",
                         "pass the model's output for one sequence")
    n_res = lp.shape[0] - 2
    if n_res < 1 or start < 0 or start + n_res > len(sequence):
        raise InputError(f"log-probs for {n_res} residues from {start} do not fit a sequence of {len(sequence)}",
                         "pass the full wild-type sequence and the crop's start (from crop_window)")
    mutants = list(mutants)
    check_mutations(sequence, mutants)
    scores = np.zeros(len(mutants), dtype=np.float64)
    for k, item in enumerate(mutants):
        label, muts = _unpack(item)
        for m in muts:
            row = m.pos - start
            if not 1 <= row <= n_res:
                raise InputError(f"mutation {label}: position {m.pos} is outside the scored window "
                                 f"(residues {start + 1}..{start + n_res})",
                                 f"mutations more than {n_res} residues apart cannot be scored in one pass: "
                                 "score each group in its own window (crop_window)")
            scores[k] += float(lp[row, TOKEN_IDS[m.mt]]) - float(lp[row, TOKEN_IDS[m.wt]])
    if not np.isfinite(scores).all():
        raise InputError("non-finite scores: the model returned NaN or infinite log-probabilities",
                         "re-run on another backend or precision (omedge verify BUNDLE)")
    return scores
