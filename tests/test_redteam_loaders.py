"""Loaders against the red-team's inputs: user files beside a run, JSON that parses into far more memory than its size,
and planted Trainer checkpoints whose ranks or statistics no run could have written."""
import gzip
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch

import epng
import epng.data as data
from epng.io import is_stale_temporary, remove_stale_temporaries
from epng.loop import EPNG_STATE, EPnGCallback, EPnGController, restore_ranks
from epng.io import MAX_STATE_JSON, StateFileError, load_state, save_state


# --- finding 5: only our own temporaries are leftovers ---------------------------------------------------------------

def test_user_files_that_look_like_temporaries_survive(tmp_path):
    mine = {".bashrc.old-bak": "x", ".env.old-2024": "OLD_SECRET=1", ".notes.txt.tmp-draft1": "my draft",
            ".cfg.old-DEADBEEF": "upper-case hex", ".cfg.tmp-abcdefg": "7 characters", ".cfg.tmp-abcdefghi": "9"}
    for name, text in mine.items(): (tmp_path / name).write_text(text)
    (tmp_path / "bashrc").write_text("y")
    with epng.checkpoint.atomic_dir(tmp_path / "checkpoint-2") as d: (d / "a.txt").write_text("2")
    ours = [".checkpoint-4.tmp-k2j_x9ab", ".metrics.json.tmp-q8w7e6_0", ".checkpoint-2.old-0123abcd"]
    for name in ours: (tmp_path / name).mkdir()
    removed = sorted(p.name for p in remove_stale_temporaries(tmp_path))
    assert removed == sorted(ours)                          # checkpoint-2 is there: its old copy is stale
    assert {n: (tmp_path / n).read_text() for n in mine} == mine and (tmp_path / "bashrc").read_text() == "y"
    assert not (tmp_path / "env").exists()                  # `.env.old-2024` is not renamed to `env`
    assert (tmp_path / "checkpoint-2/a.txt").read_text() == "2"


def test_is_stale_temporary_matches_what_tempfile_and_atomic_dir_make(tmp_path):
    import tempfile, uuid
    made = [Path(tempfile.mkstemp(prefix=".f.tmp-", dir=tmp_path)[1]).name,
            Path(tempfile.mkdtemp(prefix=".d.tmp-", dir=tmp_path)).name, f".d.old-{uuid.uuid4().hex[:8]}"]
    assert all(is_stale_temporary(n) for n in made)
    assert not any(is_stale_temporary(n) for n in [".d.old-k2j_x9ab", ".d.tmp-", "d.tmp-k2j_x9ab", "..tmp-k2j_x9ab0",
                                                   ".d.tmp-k2j_x9ab\n"])


# --- finding 6: memory a JSON file can claim -------------------------------------------------------------------------

def _peak_mib(fn, error=epng.EPnGError):
    tracemalloc.start()
    try:
        with pytest.raises(error) as err: fn()
        return err.value, tracemalloc.get_traced_memory()[1] / 2**20
    finally: tracemalloc.stop()


def test_empty_rows_bomb_stops_at_the_row_limit(tmp_path):
    bomb = tmp_path / "rows.jsonl.gz"                       # 24 MiB of `{}` lines (8.4M rows) in a 24 kB file
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        for _ in range(24): f.write(b"{}\n" * (2**20 // 3))
    script = ("import resource, epng.data as d\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              f"try: d.read_json_rows({str(bomb)!r})\n"
              "except d.EPnGError as e: print(e)\n"
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    message, peak = done.stdout.strip().rsplit("\n", 1)    # tracemalloc would slow a million rows fivefold
    assert f"rows.jsonl.gz line {data.MAX_JSON_ROWS + 1}: the number of rows" in message
    assert "raise epng.data.MAX_JSON_ROWS" in message
    assert int(peak) < 200   # MiB of peak RSS: a million empty rows (~70); all of them took ~580


def test_values_are_counted_before_a_json_file_is_parsed(tmp_path):
    doc = tmp_path / "rows.json.gz"                         # 32 MiB of `{},` (22M values) in a 32 kB file
    with gzip.open(doc, "wb", compresslevel=9) as f:
        f.write(b"[")
        for _ in range(32): f.write(b"{}," * (2**20 // 3))
        f.write(b"{}]")
    err, peak = _peak_mib(lambda: data.read_json_rows(doc))
    assert "rows.json.gz: the number of JSON values passes the limit" in str(err) and "MAX_JSON_VALUES" in str(err)
    assert peak < 160   # MiB: the text (bytes and str), never the ~1.5 GiB its parse would take


@pytest.mark.parametrize("reader", ["eval", "prefeval"])
def test_rows_that_are_not_objects_are_refused_at_their_line(tmp_path, reader):
    from epng.eval import load_eval_rows
    from epng.repro import prefeval_items
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "q", "answer": "a", "preference": "p"}\n"just text"\n')
    read = (lambda p: load_eval_rows("gsm8k", p)) if reader == "eval" else prefeval_items
    with pytest.raises(epng.EPnGError, match=r"rows.jsonl line 2 is a JSON str, not an object"): read(path)


def test_state_json_past_the_limit_is_refused_before_parsing(tmp_path):
    assert MAX_STATE_JSON <= 16 * 2**20
    save_state({"x": torch.ones(2)}, tmp_path, "trainer")
    (tmp_path / "trainer.json").write_text('{"format": "epng-state", "format_version": 1, "state": ['
                                           + "{}," * (MAX_STATE_JSON // 3) + "{}]}")
    err, peak = _peak_mib(lambda: load_state(tmp_path, "trainer"), StateFileError)
    assert f"more than any epng state ({MAX_STATE_JSON:,} bytes)" in str(err) and peak < 4


@pytest.mark.parametrize("text", ['{"format": "epng-state", "format_version": 1, "state": ' + "[" * 100_000,
                                  '{"format": "epng-state", "format_version": 1, "state": '
                                  + "[" * 900 + "]" * 900 + "}"])
def test_deeply_nested_state_is_a_state_file_error(tmp_path, text):
    save_state({"x": torch.ones(2)}, tmp_path, "trainer")
    (tmp_path / "trainer.json").write_text(text)
    with pytest.raises(StateFileError, match="trainer.json"): load_state(tmp_path, "trainer")


# --- finding 8: planted Trainer checkpoints --------------------------------------------------------------------------

@pytest.fixture
def handle(tiny):
    return epng.attach(tiny(), epng.EPnGConfig(rank=4, warmup_steps=2, cycle_interval=2))


def _owners_for(handle, ranks):
    "Slot owners that give each expert as many slots as `ranks` says, expert by expert from slot 0."
    S = handle.loras[0].num_slots
    rows = []
    for row in ranks.long().clamp(min=0):
        owner = torch.full((S,), -1, dtype=torch.long)
        owner[:min(int(row.sum()), S)] = torch.arange(len(row)).repeat_interleave(row)[:S]
        rows.append(owner)
    return torch.stack(rows)


def _plant(tmp_path, handle, ranks=None, slot_owner=None, edit=None) -> Path:
    state = EPnGController(handle, "epng", 10).state_dict()
    if edit: edit(state)
    folder = tmp_path / "checkpoint-5" / EPNG_STATE
    folder.mkdir(parents=True, exist_ok=True)
    ranks = handle.ranks.clone() if ranks is None else ranks
    save_state({"controller": state, "ranks": ranks,
                "slot_owner": _owners_for(handle, ranks) if slot_owner is None else slot_owner}, folder, "state")
    return folder.parent


def _owners(handle): return [lora.slot_owner.clone() for lora in handle.loras]


def _unchanged(handle, before):
    return torch.equal(handle.ranks, before[0]) and all(map(torch.equal, _owners(handle), before[1]))


@pytest.mark.parametrize("case, message", [
    ("sum 3x", "ranks sum to 192, but a epng run keeps its budget of 64"),
    ("sum 0", "ranks sum to 0, but a epng run keeps its budget of 64"),
    ("negative rank", "impossible for this model"),
    ("float ranks", "not whole numbers"),
    ("importance nan", "importance sums is not finite"),
    ("importance -1e30", "importance sums is negative"),
    ("counts inf", "importance counts is not finite"),
    ("history step", "cycle record 0 has step '2'"),
    ("history tau", "cycle record 0 has tau_g 'x', not a number"),
    ("history ranks", "cycle record 0's ranks is a torch.float32 tensor"),
    ("history pruned", "cycle record 0's pruned is a list, not a tensor"),
    ("owners disagree", "slot owners do not give each expert as many slots as its rank"),
    ("owners of another size", "slot owners are not a whole-number tensor of shape")])
def test_restore_refuses_a_planted_checkpoint_and_changes_nothing(tmp_path, handle, case, message):
    r, imp = handle.ranks, handle.importance
    record = lambda **kw: {"step": 2, "tau_p": float("nan"), "tau_g": 0.1, "importance": torch.rand(r.shape),
                           "pruned": torch.zeros(r.shape, dtype=torch.bool), "added": torch.zeros_like(r),
                           "ranks": r.clone(), **kw}
    edits = {"sum 3x": dict(ranks=r * 3), "sum 0": dict(ranks=torch.zeros_like(r)),
             "owners disagree": dict(slot_owner=_owners_for(handle, r).index_fill(1, torch.tensor([0]), 1)),
             "owners of another size": dict(slot_owner=_owners_for(handle, r)[:, :-8]),
             "negative rank": dict(ranks=torch.where(torch.arange(r.numel()).view(r.shape) == 0, -3, r)),
             "float ranks": dict(ranks=r.float())}
    controller = {"importance nan": lambda s: s["importance"].update(sums=torch.full_like(imp.sums, float("nan"))),
                  "importance -1e30": lambda s: s["importance"].update(sums=torch.full_like(imp.sums, -1e30)),
                  "counts inf": lambda s: s["importance"].update(counts=torch.full_like(imp.counts, float("inf"))),
                  "history step": lambda s: s["history"].append(record(step="2")),
                  "history tau": lambda s: s["history"].append(record(tau_g="x")),
                  "history ranks": lambda s: s["history"].append(record(ranks=r.float())),
                  "history pruned": lambda s: s["history"].append(record(pruned=[False]))}
    folder = _plant(tmp_path, handle, **edits.get(case, {}), edit=controller.get(case))
    before = handle.ranks.clone(), _owners(handle)
    with pytest.raises(epng.EPnGError, match=message): EPnGCallback(handle, "epng").restore(str(folder))
    assert _unchanged(handle, before)


def test_restore_accepts_a_genuine_state_and_a_cycle_without_pruning(tmp_path, handle):
    r = handle.ranks
    moved = r.clone(); moved[0, 0] += 4; moved[0, 1] -= 4     # a cycle moved ranks: the sum is the budget still
    nan_tau = {"step": 2, "tau_p": float("nan"), "tau_g": 0.1, "importance": torch.rand(r.shape),
               "pruned": torch.zeros(r.shape, dtype=torch.bool), "added": torch.zeros_like(r), "ranks": moved.clone()}
    folder = _plant(tmp_path, handle, ranks=moved, edit=lambda s: s["history"].append(nan_tau))
    callback = EPnGCallback(handle, "epng")
    assert Path(callback.restore(str(folder))).name == "checkpoint-5"
    assert torch.equal(handle.ranks, moved) and handle.loras[0].expert_slots()[0] == list(range(8))
    controller = EPnGController(handle, "epng", 10)
    controller.load_state_dict(callback._restored)
    assert len(controller.history) == 1 and controller.history[0].step == 2


@pytest.mark.parametrize("method, total, ok", [("static", 65, False), ("prune_only", 60, True),
                                               ("prune_only", 70, False), ("grow_only", 80, True),
                                               ("grow_only", 50, False), (None, 1, True)])
def test_restore_ranks_keeps_each_methods_budget_rule(handle, method, total, ok):
    ranks = torch.zeros_like(handle.ranks).flatten()
    ranks[: total // 8] = 8; ranks[total // 8] += total % 8          # budget 64 (16 experts × 4)
    ranks = ranks.view(handle.ranks.shape)
    if ok:
        restore_ranks(handle, ranks, _owners_for(handle, ranks), method)
        assert int(handle.ranks.sum()) == total
    else:
        with pytest.raises(epng.EPnGError, match=f"ranks sum to {total}, but a {method} run"):
            restore_ranks(handle, ranks, _owners_for(handle, ranks), method)
