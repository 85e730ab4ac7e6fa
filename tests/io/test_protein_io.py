"""Protein input: FASTA, PRIME's token ids (never >= 25), mutation lists, crop window, scores."""
import numpy as np
import pytest

from omedge.errors import InputError
from omedge.io.protein import (ALPHABET, EMBEDDING_ROWS, TOKEN_IDS, Mutation, check_mutations, check_token_ids,
                               crop_window, encode, parse_mutant, parse_mutations, read_fasta, score_mutants)

SEQ = "MKTAYIAKQRQISFVKSHFSRQ"  # 22 residues


# ---------------------------------------------------------------- FASTA
def test_fasta_several_records_multiline_lowercase_and_stop(tmp_path):
    p = tmp_path / "two.fasta"
    p.write_text(">sp|P1|ONE first protein\nMKTa yIAK\nqrq*\n\n; a comment\n>two\r\nLAGV\r\n")
    assert read_fasta(p) == [("sp|P1|ONE first protein", "MKTAYIAKQRQ"), ("two", "LAGV")]
    assert read_fasta(str(p)) == read_fasta(p)


def test_plain_sequence_string_is_one_record():
    assert read_fasta("mktayiak*") == [("sequence", "MKTAYIAK")]


def test_fasta_without_records_is_refused(tmp_path):
    p = tmp_path / "empty.fa"
    p.write_text("\n  \n")
    with pytest.raises(InputError, match="no sequence"):
        read_fasta(p)
    with pytest.raises(InputError, match="not found"):
        read_fasta(tmp_path / "missing.faa")
    with pytest.raises(InputError, match="'b' has an empty sequence"):
        read_fasta(">a\nLAGV\n>b\n\n>c\nLL")


@pytest.mark.parametrize("text, letter, pos, hint", [
    (">p\nMKT\nA1YI", "'1'", 5, "numbering"),
    (">p\nMKT-AY", "'-'", 4, "ungapped"),
    (">p\nMK.T", "'.'", 3, "ungapped"),
    (">p\nMK*TA", "'*'", 3, "stop"),
    (">p\nMKTA**", "'*'", 5, "stop"),       # only ONE trailing '*' is a stop codon
    (">p\nMKJT", "'J'", 3, "amino-acid codes"),
])
def test_illegal_characters_name_record_letter_and_position(text, letter, pos, hint):
    with pytest.raises(InputError) as e:
        read_fasta(text)
    msg = str(e.value)
    assert "'p'" in msg and letter in msg and f"position {pos}" in msg and hint in e.value.hint


def test_undecodable_bytes_are_named_by_position(tmp_path):
    p = tmp_path / "bin.fa"
    p.write_bytes(b">p\nM\xffK\n")
    with pytest.raises(InputError, match="'p': illegal character .* at position 2"):
        read_fasta(p)


def test_fasta_keeps_ambiguous_letters_for_encode_to_decide():
    assert read_fasta(">p\nMBZ") == [("p", "MBZ")]


# ---------------------------------------------------------------- encode
def test_encode_matches_the_esm2_table():
    assert encode("LAGV").tolist() == [0, 4, 5, 6, 7, 2]
    assert encode("C").tolist() == [0, 23, 2]
    assert encode("X").tolist() == [0, 24, 2]
    assert encode("w").tolist() == [0, 22, 2]  # lower case (soft-masked) is fine
    assert encode("DKE").tolist() == [0, 13, 15, 9, 2]
    assert [TOKEN_IDS[c] for c in "LAGVSERTIDPKQNFYMHWC"] == list(range(4, 24))
    assert len(ALPHABET) == 33 and TOKEN_IDS["<mask>"] == 32 and TOKEN_IDS["-"] == 30
    ids = encode(SEQ)
    assert ids.dtype == np.int64 and ids.shape == (len(SEQ) + 2,)


@pytest.mark.parametrize("letter", list("BUZO"))
def test_ambiguous_refused_by_default_and_mapped_to_x_on_request(letter):
    with pytest.raises(InputError) as e:
        encode(f"MK{letter}T")
    assert letter in e.value.message and "residue 3" in e.value.message and "ambiguous='x'" in e.value.hint
    assert encode(f"MK{letter}T", ambiguous="x").tolist() == [0, 20, 15, 24, 11, 2]


def test_encode_refuses_non_residues_and_bad_options():
    for bad in ["MK-T", "MK*", "MK1", "", "MKé"]:
        with pytest.raises(InputError):
            encode(bad)
    with pytest.raises(InputError, match="not an option"):
        encode("MK", ambiguous="d")
    with pytest.raises(InputError, match="position 3"):
        encode("MKß")  # str.upper() would make it 'SS', two valid serines


@pytest.mark.parametrize("ambiguous", ["refuse", "x"])
def test_fuzz_never_an_id_past_the_embedding(ambiguous):
    rng = np.random.default_rng(0)
    letters = list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcxz*-.0 ")
    encoded = 0
    for _ in range(3000):
        seq = "".join(rng.choice(letters, size=int(rng.integers(1, 12))))
        try:
            ids = encode(seq, ambiguous=ambiguous)
        except InputError:
            continue
        encoded += 1
        assert ids.min() >= 0 and ids.max() < EMBEDDING_ROWS
        assert ids[0] == 0 and ids[-1] == 2
    assert encoded > 50  # the fuzz really produced encodable sequences


def test_check_token_ids_is_a_real_guard():
    with pytest.raises(InputError, match="25-row"):
        check_token_ids(np.array([0, 4, 25, 2]))


# ---------------------------------------------------------------- mutations
def test_parse_singles_multi_and_wild_type():
    rows = parse_mutations(["A23G", "a23g:L45K", "M1A;K2P", "WT", "wt"])
    assert rows[0].mutations == (Mutation("A", 23, "G"),)
    assert rows[1].mutations == (Mutation("A", 23, "G"), Mutation("L", 45, "K"))
    assert [str(m) for m in rows[2].mutations] == ["M1A", "K2P"]
    assert rows[3].mutations == () and rows[4].mutations == ()
    assert parse_mutations("A23G:L45K")[0].text == "A23G:L45K"


@pytest.mark.parametrize("bad", ["A23", "23G", "A23G:", "A-3G", "A23G,L45K", "AG", "", "A23G:A23K"])
def test_unparseable_mutations_are_named(bad):
    with pytest.raises(InputError) as e:
        parse_mutant(bad)
    assert repr(bad.strip()) in e.value.message


def test_csv_with_mutant_column_keeps_extra_columns(tmp_path):
    p = tmp_path / "dms.csv"
    p.write_text("DMS_score,Mutant,note\n0.5,M1A,x\n-1.25,K2P:T3A,\n0,WT,wild\n")
    rows = parse_mutations(p)
    assert [r.text for r in rows] == ["M1A", "K2P:T3A", "WT"]
    assert rows[1].mutations == (Mutation("K", 2, "P"), Mutation("T", 3, "A"))
    assert rows[0].extra == {"DMS_score": "0.5", "note": "x"}
    assert rows[2].extra["DMS_score"] == "0" and rows[2].mutations == ()


def test_csv_without_header_uses_the_first_column(tmp_path):
    p = tmp_path / "list.csv"
    p.write_text("M1A,0.3\nK2P\n")
    rows = parse_mutations(str(p))
    assert [r.mutations for r in rows] == [(Mutation("M", 1, "A"),), (Mutation("K", 2, "P"),)]
    assert rows[0].extra == {"column2": "0.3"}


def test_csv_with_other_header_and_tsv(tmp_path):
    p = tmp_path / "m.tsv"
    p.write_text("variant\tscore\nM1A\t1\n")
    rows = parse_mutations(p)
    assert rows[0].mutations == (Mutation("M", 1, "A"),) and rows[0].extra == {"score": "1"}


def test_csv_errors_name_the_row(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("mutant,score\nM1A,1\nM1?,2\n")
    with pytest.raises(InputError, match=r"bad.csv line 3: cannot read the mutation 'M1\?'"):
        parse_mutations(p)
    (tmp_path / "empty.csv").write_text("\n\n")
    with pytest.raises(InputError, match="empty"):
        parse_mutations(tmp_path / "empty.csv")
    (tmp_path / "head.csv").write_text("mutant,score\n")
    with pytest.raises(InputError, match="no mutants"):
        parse_mutations(tmp_path / "head.csv")
    with pytest.raises(InputError, match="not found"):
        parse_mutations(tmp_path / "missing.csv")
    with pytest.raises(InputError, match="no mutations"):
        parse_mutations([])


def test_wild_type_mismatch_names_mutation_and_both_letters():
    with pytest.raises(InputError) as e:
        check_mutations(SEQ, parse_mutations(["M1A", "A4G:L5K"]))
    assert e.value.message == "mutation A4G:L5K: position 5 is Y in the sequence, not L"
    assert "1-based" in e.value.hint and "wild type" in e.value.hint


@pytest.mark.parametrize("mut", ["M0A", f"Q{len(SEQ) + 1}A"])
def test_positions_outside_the_sequence_are_refused(mut):
    with pytest.raises(InputError) as e:
        check_mutations(SEQ, [mut])
    assert f"mutation {mut}" in e.value.message and f"length {len(SEQ)}" in e.value.message


def test_mutant_letter_must_be_standard_and_all_problems_counted():
    for mt in "XBJ":
        with pytest.raises(InputError, match="not a standard amino acid"):
            check_mutations(SEQ, [f"M1{mt}"])
    with pytest.raises(InputError, match=r"and 1 more"):
        check_mutations(SEQ, ["A1G", "K2X", "K2A"])
    check_mutations(SEQ, ["M1A", "wt", [Mutation("K", 2, "P")]])  # no error
    with pytest.raises(InputError, match="ambiguous residue B"):
        check_mutations("MBK", ["B2A"])


# ---------------------------------------------------------------- crop window
def test_crop_window_short_sequence_is_whole():
    assert crop_window(300, [5, 100], 1022) == (0, 300)
    assert crop_window(1022, [1], 1022) == (0, 1022)


def test_crop_window_covers_most_positions_on_a_long_sequence():
    positions = [100, 4500, 4600, 4700, 5000, 5900]  # 5 of 6 fit in one 4094-residue window
    start, end = crop_window(6000, positions, 4094)
    assert end - start == 4094 and 0 <= start and end <= 6000
    covered = [p for p in positions if start < p <= end]
    assert covered == [4500, 4600, 4700, 5000, 5900]
    # a dense cluster beats a lone early position, and the window is centred on the cluster
    start, end = crop_window(6000, [10, 3000, 3001, 3002], 1000)
    assert start < 2999 and end >= 3002 and abs((start + end) / 2 - 3001) <= 1
    # clamped to the sequence at both ends
    assert crop_window(6000, [1, 2], 1000) == (0, 1000)
    assert crop_window(6000, [5999, 6000], 1000) == (5000, 6000)
    assert crop_window(6000, [], 1000) == (0, 1000)
    # equal counts: the tighter pair wins (more context around it), not the earlier one
    start, end = crop_window(6000, [100, 900, 3000, 3010], 1000)
    assert start < 3000 and end >= 3010 and abs((start + end) / 2 - 3005) <= 1


def test_crop_window_counts_each_mutation():
    # three mutations at 5500 outweigh two distinct positions near 200
    start, end = crop_window(6000, [200, 210, 5500, 5500, 5500], 1000)
    assert start < 5500 <= end and not start < 200


# ---------------------------------------------------------------- scores
def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_score_mutants_by_hand():
    rng = np.random.default_rng(1)
    lp = _log_softmax(rng.normal(size=(len(SEQ) + 2, 33))).astype(np.float32)
    # M1A: row 1; K2P: row 2; A-column is 5, M 20, K 15, P 14
    expect_m1a = lp[1, 5] - lp[1, 20]
    expect_k2p = lp[2, 14] - lp[2, 15]
    scores = score_mutants(lp, SEQ, parse_mutations(["M1A", "K2P", "M1A:K2P", "wt"]))
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, [expect_m1a, expect_k2p, expect_m1a + expect_k2p, 0.0], rtol=1e-6)
    # raw logits give the same scores, and a leading batch axis of 1 is accepted
    logits = lp[None] + 7.0
    np.testing.assert_allclose(score_mutants(logits, SEQ, ["M1A"]), [expect_m1a], rtol=1e-5)


def test_score_mutants_with_crop_offset():
    rng = np.random.default_rng(2)
    start, end = 10, 20                                   # residues 11..20 (1-based)
    lp = _log_softmax(rng.normal(size=(end - start + 2, 33)))
    # SEQ[13] = F (pos 14) -> token row 14 - 10 = 4; F is 18, L is 4
    assert SEQ[13] == "F"
    np.testing.assert_allclose(score_mutants(lp, SEQ, ["F14L"], start=start), [lp[4, 4] - lp[4, 18]])
    with pytest.raises(InputError) as e:
        score_mutants(lp, SEQ, ["M1A"], start=start)
    assert "outside the scored window" in e.value.message and "cannot be scored in one pass" in e.value.hint


def test_score_mutants_refuses_bad_inputs():
    lp = np.zeros((len(SEQ) + 2, 33))
    with pytest.raises(InputError, match="expected"):
        score_mutants(np.zeros((len(SEQ) + 2, 25)), SEQ, ["M1A"])
    with pytest.raises(InputError, match="do not fit"):
        score_mutants(np.zeros((len(SEQ) + 3, 33)), SEQ, ["M1A"])
    with pytest.raises(InputError, match="not A"):
        score_mutants(lp, SEQ, ["A1G"])
    lp[1, 5] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        score_mutants(lp, SEQ, ["M1A"])
