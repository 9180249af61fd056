"Data loading, masking, padding and batch order of epng.data (offline: tests/conftest.py blocks the hub)."
import gzip
import json
import tracemalloc
from pathlib import Path
import re
import warnings

import pytest
import torch
from transformers import AutoTokenizer

from epng import data
from epng.moe import EPnGError
from epng.eval import load_eval_rows
from epng.data import BYTE_VOCAB_SIZE, FORMATS, IGNORE_INDEX, PLAIN_TEMPLATE, NoResponseLeftError, SFTDataset, StepBatchSampler, batch_order, byte_tokenizer, collate, embedded_dataset, encode, fixture_path, load_rows, make_batches, read_json_rows, render_prompt
from epng.samples import fixture_text, synthetic_rows

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture
def tok():
    return byte_tokenizer()


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- bad input -------------------------------------------------------------------------------------------------

def test_missing_fields_names_found_and_needed(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"question": "1+1?", "answer": "2"}])
    with pytest.raises(EPnGError) as err:
        load_rows(path)
    assert "['answer', 'question']" in str(err.value) and "['query', 'response']" in str(err.value)
    with pytest.raises(EPnGError, match=r"lacks the field\(s\) \['output'\]"):
        load_rows([{"instruction": "do it", "input": ""}], fmt="codealpaca")


def test_missing_field_in_a_later_row_is_named(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"query": "q", "response": "r"}, {"query": "q2"}])
    with pytest.raises(EPnGError, match="row 1 lacks"):
        load_rows(path)


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(EPnGError, match="has no rows"):
        load_rows(tmp_path / "empty.json")
    with pytest.raises(EPnGError, match="has no rows"):
        load_rows([])


def test_unknown_format_and_unknown_source(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"query": "q", "response": "r"}])
    with pytest.raises(EPnGError, match="unknown dataset format 'alpaca'"):
        load_rows(path, fmt="alpaca")
    with pytest.raises(EPnGError, match="unknown dataset 'gsm8k'"):
        load_rows("gsm8k")


def test_missing_path(tmp_path):
    with pytest.raises(EPnGError, match="no file at"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "rows.csv").write_text("query,response\n")
    with pytest.raises(EPnGError, match="not a .json or .jsonl"):
        load_rows(tmp_path / "rows.csv")


def test_ambiguous_fields_ask_for_fmt():
    row = {"query": "q", "response": "r", "instruction": "i", "output": "o"}
    with pytest.raises(EPnGError, match="pass fmt="):
        load_rows([row])
    assert load_rows([row], fmt="codealpaca") == [("i", "o")]


def test_broken_json_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"query": "q", "response": "r"}\nnot json\n')
    with pytest.raises(EPnGError, match="line 2 is not valid JSON"):
        load_rows(tmp_path / "bad.jsonl")


# --- files that are not what they claim ------------------------------------------------------------------------------

def _gzip(path, pieces):
    with gzip.open(path, "wb") as f:
        for piece in pieces: f.write(piece)
    return path


def _peak_mib(fn):
    "Run `fn` (which must raise EPnGError) and return the error and the peak traced memory in MiB."
    tracemalloc.start()
    try:
        with pytest.raises(EPnGError) as err: fn()
        return err.value, tracemalloc.get_traced_memory()[1] / 2**20
    finally: tracemalloc.stop()


@pytest.mark.parametrize("byte", [b"\0", b" "])
def test_gzip_bomb_fails_fast_without_inflating(tmp_path, byte):
    bomb = _gzip(tmp_path / "bomb.jsonl.gz", [byte * 2**20] * 200)   # 200 MB of one byte
    assert bomb.stat().st_size < 1_000_000
    err, peak = _peak_mib(lambda: read_json_rows(bomb))
    assert "bomb.jsonl.gz line 1" in str(err) and "epng.data.MAX_JSON_LINE_BYTES" in str(err)
    assert peak < 3 * data.MAX_JSON_LINE_BYTES / 2**20      # loosely: the line limit, not the 200 MB
    with pytest.raises(EPnGError, match="bomb.jsonl.gz line 1"): load_eval_rows("gsm8k", bomb)  # evaluation reads it too


def test_size_limit_counts_inflated_bytes(tmp_path, monkeypatch):
    line = json.dumps({"query": "q" * 100, "response": "r"}).encode() + b"\n"
    small = _gzip(tmp_path / "rows.jsonl.gz", [line * 1000])                 # about 110 kB of text
    assert len(read_json_rows(small)) == 1000
    monkeypatch.setattr(data, "MAX_JSON_BYTES", 2**20)
    big = _gzip(tmp_path / "big.jsonl.gz", [line * 1000] * 500)             # about 55 MB of text
    err, peak = _peak_mib(lambda: read_json_rows(big))
    assert "big.jsonl.gz: the text inflated from this gzip file passes the limit of 1,048,576 bytes" in str(err)
    assert "raise epng.data.MAX_JSON_BYTES" in str(err) and peak < 16    # loosely: the limit, not the 55 MB
    doc = _gzip(tmp_path / "doc.json.gz", [b"["] + [b" " * 2**20] * 50 + [b"]"])  # a whole .json document
    err, peak = _peak_mib(lambda: read_json_rows(doc))
    assert "doc.json.gz: the text" in str(err) and peak < 16
    (tmp_path / "plain.jsonl").write_bytes(line * 10_000)
    with pytest.raises(EPnGError, match="plain.jsonl: the text passes the limit"): load_rows(tmp_path / "plain.jsonl")


def test_line_limit_names_the_line(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_JSON_LINE_BYTES", 100)
    ok = json.dumps({"query": "q", "response": "r"})
    (tmp_path / "rows.jsonl").write_text(ok + "\n" + ok + "\n" + json.dumps({"query": "q" * 200, "response": "r"}) + "\n")
    with pytest.raises(EPnGError, match=r"rows.jsonl line 3: the line passes the limit of 100 bytes.*MAX_JSON_LINE_BYTES"):
        load_rows(tmp_path / "rows.jsonl")
    (tmp_path / "rows.jsonl").write_text(ok + "\n" + ok)                 # no newline at the end: still read
    assert len(load_rows(tmp_path / "rows.jsonl")) == 2


def test_nesting_limit(tmp_path, monkeypatch):
    def row(depth): return '{"query": ' + "[" * (depth - 1) + "]" * (depth - 1) + ', "response": "r"}'
    (tmp_path / "ok.jsonl").write_text(row(data.MAX_JSON_DEPTH) + "\n")
    assert read_json_rows(tmp_path / "ok.jsonl")[0]["response"] == "r"
    for depth in [data.MAX_JSON_DEPTH + 1, 200_000]:                      # the second would hit the recursion limit
        (tmp_path / "deep.jsonl").write_text('{"query": "q", "response": "r"}\n' + row(depth) + "\n")
        with pytest.raises(EPnGError, match=r"deep.jsonl line 2 nests lists/objects more than 64 deep.*MAX_JSON_DEPTH"):
            read_json_rows(tmp_path / "deep.jsonl")
    (tmp_path / "deep.json").write_text("[" + row(data.MAX_JSON_DEPTH) + "]")  # the list adds one level
    with pytest.raises(EPnGError, match="deep.json nests"): read_json_rows(tmp_path / "deep.json")
    monkeypatch.setattr(data, "MAX_JSON_DEPTH", 70)
    assert len(read_json_rows(tmp_path / "deep.json")) == 1


@pytest.mark.parametrize("encoding,message", [("utf-16", "is UTF-16 text"), ("utf-16-le", "holds NUL bytes"),
                                              ("utf-32", "is UTF-32 text"), ("latin-1", "line 2 is not UTF-8 text")])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_other_encodings_say_resave_as_utf8(tmp_path, encoding, message, suffix):
    rows = [{"query": "1+1?", "response": "2"}, {"query": "café", "response": "x"}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) if suffix == ".jsonl" else \
        "[" + json.dumps(rows[0]) + ",\n" + json.dumps(rows[1], ensure_ascii=False) + "]"
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(text.encode(encoding))
    with pytest.raises(EPnGError) as err: load_rows(path)
    assert str(path) in str(err.value) and message in str(err.value) and "re-save it as UTF-8" in str(err.value)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))            # a UTF-8 byte-order mark is fine
    assert load_rows(path)[1] == ("café", "x")


def test_broken_gzip_and_unreadable_paths(tmp_path):
    whole = gzip.compress(b'{"query": "q", "response": "r"}\n')
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:-9])
    (tmp_path / "plain.jsonl.gz").write_text('{"query": "q", "response": "r"}\n')
    for name in ["cut.jsonl.gz", "plain.jsonl.gz"]:
        with pytest.raises(EPnGError, match=f"{name} is not a complete gzip file"): load_rows(tmp_path / name)
    (tmp_path / "ok.jsonl.gz").write_bytes(whole)
    assert load_rows(tmp_path / "ok.jsonl.gz") == [("q", "r")]
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(EPnGError, match="cannot read .*dir.jsonl"): read_json_rows(tmp_path / "dir.jsonl")


@pytest.mark.parametrize("name", ["gsm8k_sample.jsonl", "../data.py", "/etc/passwd", "metamathqa_sample.jsonl"])
def test_embedded_accepts_only_embedded_names(name):
    with pytest.raises(EPnGError, match="the embedded ones are embedded:codealpaca, embedded:metamathqa"):
        load_rows(f"embedded:{name}")
    with pytest.raises(EPnGError, match="no shipped sample"): fixture_path(f"../fixtures/{Path(name).name}")


# --- local files -------------------------------------------------------------------------------------------------

def test_local_jsonl_and_json_load_the_same_rows(tmp_path):
    rows = [{"instruction": f"Task {i}", "input": "ctx" if i % 2 else "", "output": f"print({i})"} for i in range(5)]
    _write_jsonl(tmp_path / "code.jsonl", rows)
    (tmp_path / "code.json").write_text(json.dumps(rows))
    got = load_rows(tmp_path / "code.jsonl")
    assert got == load_rows(str(tmp_path / "code.json"))
    assert got[0] == ("Task 0", "print(0)") and got[1] == ("Task 1\n\nctx", "print(1)")


def test_limit_is_a_seeded_subset(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [{"query": f"q{i}", "response": f"r{i}"} for i in range(50)])
    a, b = load_rows(path, limit=10, seed=0), load_rows(path, limit=10, seed=0)
    assert a == b and len(a) == 10 and len(set(a)) == 10
    assert a != load_rows(path, limit=10, seed=1)
    assert len(load_rows(path, limit=500)) == 50


def test_shipped_fixtures_match_the_generator():
    for fmt in ("metamathqa", "codealpaca"):
        text = fixture_path(fmt).read_text(encoding="utf-8")
        assert text == fixture_text(fmt)
        assert len(text.splitlines()) == 200
        assert set(json.loads(text.splitlines()[0])) >= set(FORMATS[fmt].required)
    assert load_rows("embedded") == embedded_dataset("metamathqa")
    assert load_rows("embedded:codealpaca") == embedded_dataset("codealpaca")


def test_generated_math_is_correct_and_code_compiles():
    for row in synthetic_rows("metamathqa", n=50, seed=5):
        for left, right in re.findall(r"(\d+(?: [-+*/] \d+)+) = (\d+)", row["response"]):
            assert eval(left) == int(right)
        assert re.search(r"\nThe answer is: \d+$", row["response"])
    for row in synthetic_rows("codealpaca", n=50, seed=5):
        compile(row["output"], "<row>", "exec")


# --- tokenizer and masking -----------------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip_and_ids(tok, tmp_path):
    assert (len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (BYTE_VOCAB_SIZE, 0, 1, 2)
    text = "Ünïcödé ✓ 数学\n\t🙂 end "
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and ids[1:] == [b + 3 for b in text.encode("utf-8")]
    assert tok.decode(ids, skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path / "t")
    again = AutoTokenizer.from_pretrained(tmp_path / "t")
    assert again(text)["input_ids"] == ids and again.eos_token_id == 2


def test_plain_template_masks_the_prompt(tok):
    ex = encode(tok, "Add 2 and 3.", "5", max_length=256)
    prompt_ids = tok(PLAIN_TEMPLATE.format(prompt="Add 2 and 3."))["input_ids"]
    n = len(prompt_ids)
    assert ex["input_ids"][:n] == prompt_ids
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert ex["labels"][n:] == ex["input_ids"][n:] == [ord("5") + 3, tok.eos_token_id]


def test_chat_template_masks_up_to_the_generation_prompt():
    tok = byte_tokenizer(chat_template=CHAT)
    ex = encode(tok, "Add 2 and 3.", "5", max_length=256)
    prompt = "<|user|>\nAdd 2 and 3.\n<|assistant|>\n"
    assert render_prompt(tok, "Add 2 and 3.") == prompt
    n = len(prompt.encode())
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    learned = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert learned == [b + 3 for b in b"5\n"] + [tok.eos_token_id]
    assert tok.decode(ex["input_ids"]) == prompt + "5\n<eos>"


def test_chat_template_that_writes_eos_gets_no_second_one():
    tok = byte_tokenizer(chat_template=CHAT.replace("{{ m['content'] }}\n", "{{ m['content'] }}<eos>"))
    ex = encode(tok, "q", "a", max_length=64)
    assert ex["input_ids"].count(tok.eos_token_id) == 2  # one after the user turn, one after the answer
    assert ex["input_ids"][-1] == tok.eos_token_id


def test_truncation_keeps_the_start_and_refuses_a_full_prompt(tok):
    long = encode(tok, "q", "x" * 300, max_length=50)
    assert len(long["input_ids"]) == 50 and long["input_ids"] == encode(tok, "q", "x" * 300, 400)["input_ids"][:50]
    with pytest.raises(NoResponseLeftError, match="raise max_length"):
        encode(tok, "q" * 100, "x", max_length=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = SFTDataset([("q" * 100, "x"), ("q", "x")], tok, max_length=50)
    assert (len(ds), ds.skipped) == (1, 1)


# --- batches -------------------------------------------------------------------------------------------------------

def test_collate_pads_right_with_masked_labels():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_batch_order_is_deterministic_and_a_partition():
    a = batch_order(100, 8, seed=3, epoch=2)
    assert a == batch_order(100, 8, seed=3, epoch=2)
    assert a != batch_order(100, 8, seed=3, epoch=1) and a != batch_order(100, 8, seed=4, epoch=2)
    flat = [i for b in a for i in b]
    assert len(a) == 12 and len(set(flat)) == 96 and all(len(b) == 8 for b in a)
    tail = batch_order(100, 8, seed=3, drop_last=False)
    assert sorted(i for b in tail for i in b) == list(range(100))


def test_resume_replays_the_same_batches(tok):
    ds = SFTDataset(embedded_dataset(limit=40), tok, max_length=256)
    full = list(make_batches(ds, 6, seed=1, num_steps=12))  # 6 batches per epoch: crosses an epoch boundary
    resumed = list(make_batches(ds, 6, seed=1, start_step=5, num_steps=7))
    for x, y in zip(full[5:], resumed):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    assert len(list(StepBatchSampler(40, 6, seed=1, num_steps=12))) == 12
