"Adapters on disk: atomic writes, exact save/load, clear errors, and peft export that peft itself loads."
import copy, errno, json, math, os, shutil, subprocess, sys
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
import epng
import epng.checkpoint as checkpoint
import epng.io as eio
from epng.io import atomic_dir, atomic_write_json, remove_stale_temporaries, write_safetensors
from epng.checkpoint import save_adapter, load_adapter, load_adapter_into, export_peft, from_peft_layout, InvalidAdapterError, ADAPTER_CONFIG, ADAPTER_WEIGHTS

peft = pytest.importorskip("peft")
# peft 0.21 checks rank_pattern keys against module names only, so it warns about patterns it does apply
pytestmark = pytest.mark.filterwarnings("ignore:.*_pattern keys did not match any targeted module")


def _base(arch="olmoe", **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(epng.tiny_moe_config(arch, **overrides))


def _trained(base, targets=("gate_proj", "up_proj"), steps=3):
    "A handle on a copy of `base` with skewed ranks (pruned, grown into free slots) and trained, non-zero B."
    model = copy.deepcopy(base)
    h = epng.attach(model, epng.EPnGConfig(targets=targets))
    g = torch.Generator().manual_seed(1)
    h.prune(0, 3); h.prune(1, 0); h.grow(1, 5, 9, generator=g); h.grow(0, 6, 2, generator=g)
    opt = torch.optim.AdamW(h.parameters(), lr=1e-2, weight_decay=0.1)
    h.bind_optimizer(opt)
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
    model.eval()
    return h, ids


def _logits(model, ids):
    model.eval()
    with torch.no_grad(): return model(input_ids=ids).logits


# --- atomic writes -------------------------------------------------------------------------------------------------

def test_failed_folder_write_keeps_old_folder_and_leaves_nothing(tmp_path):
    with atomic_dir(tmp_path / "ckpt") as d:
        (d / "a.json").write_text('{"step": 1}'); (d / "sub").mkdir(); (d / "sub/b.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "ckpt") as d:
            (d / "a.json").write_text('{"step": 2, "partial')
            raise RuntimeError("crash mid-write")
    assert json.loads((tmp_path / "ckpt/a.json").read_text()) == {"step": 1}
    assert (tmp_path / "ckpt/sub/b.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failed_first_write_leaves_no_folder(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "new") as d:
            (d / "x").write_text("half"); raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_successful_folder_write_replaces_whole_folder(tmp_path):
    with atomic_dir(tmp_path / "ckpt") as d: (d / "old_only.txt").write_text("1")
    with atomic_dir(tmp_path / "ckpt") as d: (d / "new.txt").write_text("2")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_atomic_files_keep_old_content_on_failure(tmp_path):
    atomic_write_json({"step": 1}, tmp_path / "state.json")
    with pytest.raises(TypeError):
        atomic_write_json({"x": object()}, tmp_path / "state.json")   # fails mid-save: not JSON
    assert json.loads((tmp_path / "state.json").read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_atomic_dir_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(epng.EPnGError, match="is a file"):
        with atomic_dir(tmp_path / "f"): pass




@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_saved_files_and_folders_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        with atomic_dir(tmp_path / "ckpt") as d: (d / "a.txt").write_text("1")
        atomic_write_json({"step": 1}, tmp_path / "state.json")
        write_safetensors({"w": torch.ones(1)}, tmp_path / "w.safetensors")
    finally: os.umask(old)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o777 & ~mask   # not mkdtemp's 0700
    for f in ["state.json", "w.safetensors", "ckpt/a.txt"]:
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o666 & ~mask, f  # not mkstemp's 0600


def _disk_full_after(n_bytes):
    "A stand-in for safetensors' save_file that writes `n_bytes` and then finds the disk full."
    def save(tensors, path, metadata=None):
        Path(path).write_bytes(b"x" * n_bytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save


def test_disk_full_names_the_folder_and_keeps_the_previous_adapter(tmp_path, monkeypatch):
    h, ids = _trained(_base(), steps=1)
    save_adapter(h, tmp_path / "out/adapter", extra={"step": 1})
    before = {p.name: p.read_bytes() for p in (tmp_path / "out/adapter").iterdir()}
    monkeypatch.setattr(eio, "save_file", _disk_full_after(1000))
    with pytest.raises(epng.EPnGError) as err:
        save_adapter(h, tmp_path / "out/adapter", extra={"step": 2})
    msg = str(err.value)
    assert f"could not save into {tmp_path / 'out'}: disk full" in msg and "Free some space" in msg
    assert "unchanged" in msg and isinstance(err.value.__cause__, OSError)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out/adapter").iterdir()} == before
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["adapter"]          # no temporary left


def test_nested_save_names_the_outer_folder(tmp_path, monkeypatch):
    "A checkpoint folder holding an adapter folder (as training writes it): the error names the output folder."
    h, _ = _trained(_base(), steps=1)
    monkeypatch.setattr(eio, "save_file", _disk_full_after(10))
    with pytest.raises(epng.EPnGError) as err:
        with atomic_dir(tmp_path / "run/checkpoint-5") as d: save_adapter(h, d / "adapter")
    assert f"could not save into {tmp_path / 'run'}: disk full" in str(err.value) and ".tmp-" not in str(err.value)
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.parametrize("fail_at", ["mkstemp", "write", "os.replace"])
def test_atomic_file_errors_name_the_folder(tmp_path, monkeypatch, fail_at):
    atomic_write_json({"step": 1}, tmp_path / "state.json")
    def boom(*args, **kwargs): raise OSError(errno.ENOSPC, "No space left on device")
    target = {"mkstemp": (eio.tempfile, "mkstemp"), "write": (Path, "write_text"),
              "os.replace": (eio.os, "replace")}[fail_at]
    monkeypatch.setattr(*target, boom)
    with pytest.raises(epng.EPnGError, match=f"could not save into {tmp_path}: disk full"):
        atomic_write_json({"step": 2}, tmp_path / "state.json")
    monkeypatch.undo()
    assert json.loads((tmp_path / "state.json").read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_file_in_the_way(tmp_path):
    h, _ = _trained(_base(), steps=1)
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(epng.EPnGError, match=f"could not save into {tmp_path / 'out'}: a file is in the way"):
        save_adapter(h, tmp_path / "out/adapter")
    with pytest.raises(epng.EPnGError, match="a file is in the way"):
        atomic_write_json({}, tmp_path / "out/state.json")
    assert (tmp_path / "out").read_text() == "not a folder"


def test_permission_denied_names_the_folder(tmp_path, monkeypatch):
    def denied(*args, **kwargs): raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(eio.tempfile, "mkdtemp", denied)
    with pytest.raises(epng.EPnGError, match=f"could not save into {tmp_path}: permission denied .*Make the folder writable"):
        with atomic_dir(tmp_path / "ckpt"): pass


READ_ONLY_SAVE = """
import sys, epng
from pathlib import Path
from epng.io import atomic_dir
try:
    with atomic_dir(Path(sys.argv[1]) / "ckpt") as d: (d / "a.txt").write_text("2")
except epng.EPnGError as e: print("EPnGError:", e)
"""


def test_read_only_folder_for_real(tmp_path):
    "A read-only bind mount (bubblewrap), so that the test holds even when run as root."
    out = tmp_path / "out"
    with atomic_dir(out / "ckpt") as d: (d / "a.txt").write_text("1")
    if not shutil.which("bwrap") or subprocess.run(["bwrap", "--bind", "/", "/", "true"]).returncode:
        pytest.skip("bubblewrap cannot make a read-only mount here")
    run = subprocess.run(["bwrap", "--bind", "/", "/", "--ro-bind", str(out), str(out), "--dev", "/dev",
                          sys.executable, "-c", READ_ONLY_SAVE, str(out)], capture_output=True, text=True, timeout=120)
    assert f"EPnGError: could not save into {out}: read-only file system" in run.stdout, run.stdout + run.stderr
    assert (out / "ckpt/a.txt").read_text() == "1" and [p.name for p in out.iterdir()] == ["ckpt"]


def test_remove_stale_temporaries_after_killed_saves(tmp_path):
    with atomic_dir(tmp_path / "checkpoint-2") as d: (d / "a.txt").write_text("2")
    for name in ["checkpoint-4", "metrics.json"]:   # a child killed inside the save leaves its temporary behind
        pid = os.fork()
        if pid == 0:
            try:
                with (eio._atomic_file if name.endswith(".json") else atomic_dir)(tmp_path / name) as t:
                    (t if name.endswith(".json") else t / "half.txt").write_text("{"); os._exit(0)
            finally: os._exit(1)
        os.waitpid(pid, 0)
    # a save killed between its two renames: the old copy aside, the new one still under its temporary name
    os.rename(tmp_path / "checkpoint-2", tmp_path / ".checkpoint-2.old-0123abcd")
    keep = [tmp_path / "notes.tmp-1", tmp_path / ".cache", tmp_path / "checkpoint-2.old-1"]
    for k in keep: k.mkdir()
    leftovers = sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name and p.name.startswith("."))
    assert [n.split(".tmp-")[0] for n in leftovers] == [".checkpoint-4", ".metrics.json"]
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == leftovers and all(p.parent == tmp_path for p in removed)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".cache", "checkpoint-2", "checkpoint-2.old-1",
                                                                  "notes.tmp-1"])
    assert (tmp_path / "checkpoint-2/a.txt").read_text() == "2"          # the last complete copy is back
    assert remove_stale_temporaries(tmp_path) == [] and remove_stale_temporaries(tmp_path / "nowhere") == []


# --- save / load ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,targets", [("olmoe", ("gate_proj", "up_proj")),
                                          ("olmoe", ("up_proj", "down_proj")),
                                          ("qwen2_moe", ("gate_proj", "up_proj", "down_proj"))])
def test_save_load_is_exact(tmp_path, arch, targets):
    base = _base(arch)
    h, ids = _trained(base, targets)
    expected = _logits(h.model, ids)
    save_adapter(h, tmp_path / "a", extra={"step": 3})
    meta = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert meta["ranks"] == h.ranks.tolist() and meta["extra"] == {"step": 3} and meta["targets"] == list(targets)
    assert meta["model"]["model_type"] == arch and meta["slots"] == [128, 128]
    tensors = load_file(tmp_path / "a" / ADAPTER_WEIGHTS)
    assert tensors[f"layers.1.{targets[0]}.A"].shape[1] == 17   # padded to the layer's largest rank, not the slots

    h2 = load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert h2.config == h.config and torch.equal(h2.ranks, h.ranks) and h2.budget == h.budget
    assert all(torch.equal(a.slot_owner, b.slot_owner) for a, b in zip(h.loras, h2.loras))   # the same slots
    assert torch.equal(h2.importance.sums, h.importance.sums) and torch.equal(h2.importance.counts, h.importance.counts)
    for l, (a, b) in enumerate(zip(h.loras, h2.loras)):
        for t in targets:
            assert torch.equal(a.A[t], b.A[t]) and torch.equal(a.B[t], b.B[t]), (l, t)
    assert (_logits(h2.model, ids) - expected).abs().max().item() == 0.0

    h3 = epng.attach(copy.deepcopy(base), epng.EPnGConfig(targets=targets))
    load_adapter_into(h3, tmp_path / "a")
    assert (_logits(h3.model, ids) - expected).abs().max().item() == 0.0


def test_resumed_handle_trains_and_grows(tmp_path):
    base = _base()
    h, ids = _trained(base)
    save_adapter(h, tmp_path / "a")
    h2 = epng.attach(copy.deepcopy(base))
    load_adapter_into(h2, tmp_path / "a")
    opt = torch.optim.AdamW(h2.parameters(), lr=1e-2)   # built after the restore: sees the grown parameters
    h2.bind_optimizer(opt)
    h2.model.train()
    losses = []
    for _ in range(3):
        loss = h2.model(input_ids=ids, labels=ids).loss
        loss.backward(); opt.step(); opt.zero_grad(); losses.append(loss.item())
    assert losses[-1] < losses[0]
    params = list(h2.parameters())
    h2.grow(1, 5, 8)   # 17 + 8 = 25, into free slots of the same tensors
    assert int(h2.ranks[1, 5]) == 25 and all(p is q for p, q in zip(h2.parameters(), params))
    assert h2.factors(0, 0, "gate_proj")[1][:, 3].abs().sum() > 0 and h2.factors(0, 3, "up_proj")[0].numel() == 0


def test_load_errors(tmp_path):
    base = _base()
    h, _ = _trained(base, steps=1)
    save_adapter(h, tmp_path / "a")
    with pytest.raises(epng.EPnGError, match="no epng adapter"):
        load_adapter(copy.deepcopy(base), tmp_path)
    export_peft(h, tmp_path / "p")
    with pytest.raises(epng.EPnGError, match="PeftModel.from_pretrained"):
        load_adapter(copy.deepcopy(base), tmp_path / "p")
    for overrides, message in [({"num_experts": 4}, "num experts: adapter 8, model 4"),
                               ({"num_hidden_layers": 3}, "num moe layers: adapter 2, model 3"),
                               ({"hidden_size": 32}, "hidden size: adapter 64, model 32"),
                               ({"intermediate_size": 16}, "intermediate size: adapter 32, model 16")]:
        other = _base(**overrides)
        with pytest.raises(epng.EPnGError, match=message):
            load_adapter(other, tmp_path / "a")
        assert not any(hasattr(m, "epng_lora") for m in other.modules())   # failed before attaching
    with pytest.raises(epng.EPnGError, match="model type: adapter 'olmoe', model 'qwen2_moe'"):
        load_adapter(_base("qwen2_moe"), tmp_path / "a")
    wrong_targets = epng.attach(copy.deepcopy(base), epng.EPnGConfig(targets=("gate_proj", "up_proj", "down_proj")))
    with pytest.raises(epng.EPnGError, match="targets"):
        load_adapter_into(wrong_targets, tmp_path / "a")
    wrong_rank = epng.attach(copy.deepcopy(base), epng.EPnGConfig(rank=4))
    with pytest.raises(epng.EPnGError, match="rank: adapter 8, handle 4"):
        load_adapter_into(wrong_rank, tmp_path / "a")
    with pytest.raises(epng.EPnGError, match="JSON values"):
        save_adapter(h, tmp_path / "b", extra={"t": torch.ones(1)})
    assert not (tmp_path / "b").exists()


# --- damaged adapters ----------------------------------------------------------------------------------------------

def _live(base):
    "A handle mid-training: its own factors, AdamW state, gradients, importance and slots (not the adapter's)."
    h = epng.attach(copy.deepcopy(base))
    opt = torch.optim.AdamW(h.parameters(), lr=1e-2)
    h.bind_optimizer(opt)
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    h.model.train()
    for _ in range(2):
        h.model(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
    h.model(input_ids=ids, labels=ids).loss.backward()          # gradients pending too
    h.prune(1, 2)
    return h


def _everything(h):
    "Every tensor a load could touch, the optimizer's state, and which Parameter objects it refers to."
    params = [p for lora in h.loras for p in lora.parameters()]
    opt = h.optimizer
    return {"params": [(id(p), p.detach().clone(), None if p.grad is None else p.grad.clone()) for p in params],
            "ranks": h.ranks.clone(), "owners": [lora.slot_owner.clone() for lora in h.loras], "budget": h.budget,
            "importance": {k: v.clone() for k, v in h.importance.state_dict().items()},
            "groups": [[id(p) for p in g["params"]] for g in opt.param_groups],
            "state": {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
                      for p, st in opt.state.items()}}


def _same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict): return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)): return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _edit(src, dst, meta=None, tensors=None):
    "Copy the adapter `src` to `dst`, passing its JSON through `meta` and its tensors through `tensors`."
    shutil.copytree(src, dst)
    if meta:
        m = json.loads((dst / ADAPTER_CONFIG).read_text()); meta(m)
        (dst / ADAPTER_CONFIG).write_text(json.dumps(m))
    if tensors:
        t = load_file(dst / ADAPTER_WEIGHTS); tensors(t)
        save_file(t, dst / ADAPTER_WEIGHTS)
    return dst


def _set(d, key, value): d[key] = value
def _set_rank(m, t, l, e, r):
    m["ranks"][l][e] = r
    t[f"layers.{l}.ranks"][e] = r
def _nan(t): t["layers.1.gate_proj.A"][2, 0, 0] = math.nan
def _cut(f): f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

# The saved adapter: ranks [[8,8,8,0,8,8,10,8], [0,8,8,8,8,17,8,8]] (sum 123), slots [128, 128], budget 128.
DAMAGE = {
    "nan factor": (dict(tensors=_nan), "layers.1.gate_proj.A holds NaN or infinite values"),
    "inf importance": (dict(tensors=lambda t: t["importance.sums"].__setitem__((0, 1), math.inf)),
                       "importance.sums holds NaN or infinite values"),
    "negative count": (dict(tensors=lambda t: t["importance.counts"].__setitem__(0, -1.0)),
                       "importance.counts holds negative values"),
    "rank -3": (dict(meta=lambda m: m["ranks"][0].__setitem__(1, -3)), "expert 1 in MoE layer 0 is -3"),
    "fractional rank": (dict(meta=lambda m: m["ranks"][0].__setitem__(1, 2.5)), "expert 1 in MoE layer 0 is 2.5"),
    "boolean rank": (dict(meta=lambda m: m["ranks"][0].__setitem__(1, True)), "expert 1 in MoE layer 0 is True"),
    "rank > rank limit": (dict(meta=lambda m: m["ranks"][1].__setitem__(5, 40)), "is 40: ranks are whole numbers from 0 to 32"),
    "rank > max_rank": (dict(meta=lambda m: m["config"].__setitem__("max_rank", 9)), "is 10: ranks are whole numbers from 0 to 9"),
    "rank sum lowered": (dict(meta=lambda m: m["ranks"][0].__setitem__(1, 4)), "add up to 119, but it records a rank sum of 123"),
    "rank sum raised": (dict(meta=lambda m: m["ranks"][1].__setitem__(1, 16)), "add up to 131, but it records a rank sum of 123"),
    "ranks only in the tensor": (dict(tensors=lambda t: t["layers.0.ranks"].__setitem__(1, 4)),
                                 r"layers.0.ranks holds \[8, 4, .*but the JSON gives the ranks \[8, 8,"),
    "edited budget": (dict(meta=lambda m: m.update(budget=512, rank_sum=sum(map(sum, m["ranks"])))),
                      r"budget 512 is not a whole number in 1..128, the most its config and shapes give \(rank 8 × 2 MoE layers × 8 experts\)"),
    "slots 10**9": (dict(meta=lambda m: m["slots"].__setitem__(1, 10**9)), "slots must be 2 whole numbers in 1..256"),
    "slots as text": (dict(meta=lambda m: m["slots"].__setitem__(0, "16")), "slots must be 2 whole numbers"),
    "layer over its slots": (dict(meta=lambda m: m["slots"].__setitem__(1, 64)), "MoE layer 1's ranks add up to 65, more than its 64 slots"),
    "slot owners disagree": (dict(tensors=lambda t: t["layers.0.slot_owner"].__setitem__(0, 5)),
                             "layers.0.slot_owner does not give each expert as many slots as its rank"),
    "slot owner out of range": (dict(tensors=lambda t: t["layers.1.slot_owner"].__setitem__(127, 99)),
                                "layers.1.slot_owner does not give each expert"),
    "missing tensor": (dict(tensors=lambda t: t.pop("layers.0.up_proj.B")), r"tensors missing: \['layers.0.up_proj.B'\]"),
    "surprise tensor": (dict(tensors=lambda t: t.update(payload=torch.zeros(3))), r"tensors not expected: \['payload'\]"),
    "wrong shape": (dict(tensors=lambda t: t.update({"layers.0.gate_proj.A": torch.zeros(8, 11, 64)})),
                    r"layers.0.gate_proj.A is F32 \(8, 11, 64\), expected F32 \(8, 10, 64\)"),
    "wrong dtype": (dict(tensors=lambda t: t.update({"layers.1.up_proj.B": t["layers.1.up_proj.B"].double()})),
                    r"layers.1.up_proj.B is F64 \(8, 32, 17\), expected F32"),
    "ranks as floats": (dict(tensors=lambda t: t.update({"layers.0.ranks": t["layers.0.ranks"].float()})),
                        r"layers.0.ranks is F32 \(8,\), expected I64"),
    "num_experts as text": (dict(meta=lambda m: _set(m, "num_experts", "8")), "num_experts is '8', not a whole number"),
    "unknown config key": (dict(meta=lambda m: m["config"].update(evil=1)), "its config is not a valid EPnGConfig"),
    "bad config value": (dict(meta=lambda m: m["config"].update(lora_alpha="16")), "its config is not a valid EPnGConfig"),
    "missing field": (dict(meta=lambda m: m.pop("slots")), "it lacks the list 'slots'"),
    "not an adapter": (dict(meta=lambda m: _set(m, "format", "pickle")), "its format is 'pickle', not 'epng-adapter'"),
}
RAW_DAMAGE = {   # file-level damage: (file, how, message)
    "truncated safetensors": (ADAPTER_WEIGHTS, _cut, "not a readable safetensors file"),
    "empty safetensors": (ADAPTER_WEIGHTS, lambda f: f.write_bytes(b""), "not a readable safetensors file"),
    "garbage safetensors": (ADAPTER_WEIGHTS, lambda f: f.write_bytes(b"\x80\x00" * 50), "not a readable safetensors file"),
    "empty json": (ADAPTER_CONFIG, lambda f: f.write_text(""), "it is empty"),
    "truncated json": (ADAPTER_CONFIG, _cut, "it is not valid JSON"),
    "non-json metadata": (ADAPTER_CONFIG, lambda f: f.write_text("format: epng-adapter\n"), "it is not valid JSON"),
    "json list": (ADAPTER_CONFIG, lambda f: f.write_text("[1, 2]"), "it holds a JSON list, not an object"),
    "latin-1 json": (ADAPTER_CONFIG, lambda f: f.write_bytes(f.read_bytes().replace(b"}", b"\xe9}", 1)), "not UTF-8 text"),
    "deep json": (ADAPTER_CONFIG, lambda f: f.write_text("[" * 100_000 + "]" * 100_000), "it nests its JSON deeper than Python can parse"),
}


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    base = _base()
    h, _ = _trained(base)
    folder = save_adapter(h, tmp_path_factory.mktemp("good") / "adapter")
    return base, h, folder


def test_the_good_adapter_loads(saved_adapter, tmp_path):
    base, h, folder = saved_adapter
    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert meta["rank_sum"] == 123 and meta["budget"] == 128 and meta["slots"] == [128, 128]
    live = _live(base)
    load_adapter_into(live, _edit(folder, tmp_path / "copy"))
    assert torch.equal(live.ranks, h.ranks)
    assert all(torch.equal(a.slot_owner, b.slot_owner) for a, b in zip(live.loras, h.loras))


def test_an_adapter_of_format_1_still_loads(saved_adapter, tmp_path):
    "Format 1 (before fixed-shape slots) gave a padded capacity and no slot owners: loaded expert by expert from slot 0."
    base, h, folder = saved_adapter
    def as_format_1(m):
        m.update(format_version=1, capacity=[16, 24]); m.pop("slots")
    old = _edit(folder, tmp_path / "old", meta=as_format_1,
                tensors=lambda t: [t.pop(f"layers.{l}.slot_owner") for l in range(2)])
    ids = torch.randint(3, 256, (2, 12))
    h2 = load_adapter(copy.deepcopy(base), old)
    assert torch.equal(h2.ranks, h.ranks) and h2.loras[1].expert_slots()[1] == list(range(0, 8))
    assert (_logits(h2.model, ids) - _logits(h.model, ids)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("case", list(DAMAGE) + list(RAW_DAMAGE))
def test_a_damaged_adapter_is_refused_and_changes_nothing(saved_adapter, tmp_path, case):
    base, _, folder = saved_adapter
    if case in DAMAGE:
        edits, message = DAMAGE[case]
        bad = _edit(folder, tmp_path / "bad", **edits)
        named = bad / ADAPTER_CONFIG if "meta" in edits else bad / ADAPTER_WEIGHTS
    else:
        file, how, message = RAW_DAMAGE[case]
        bad = _edit(folder, tmp_path / "bad")
        how(bad / file)
        named = bad / file
    live = _live(base)
    before = _everything(live)
    with pytest.raises(InvalidAdapterError, match=message) as err:
        load_adapter_into(live, bad)
    assert str(named) in str(err.value) and isinstance(err.value, epng.EPnGError)
    assert _same(_everything(live), before)
    fresh = copy.deepcopy(base)
    with pytest.raises(InvalidAdapterError, match=message): load_adapter(fresh, bad)
    assert not any(hasattr(m, "epng_lora") for m in fresh.modules())   # refused before attaching


def test_an_oversized_adapter_json_is_not_read(saved_adapter, tmp_path, monkeypatch):
    base, _, folder = saved_adapter
    bad = _edit(folder, tmp_path / "big", meta=lambda m: m["extra"].update(padding="x" * 100_000))
    monkeypatch.setattr(checkpoint, "MAX_ADAPTER_JSON_BYTES", 50_000)
    with pytest.raises(InvalidAdapterError, match=r"epng_adapter.json is not a usable .*more than any adapter's JSON \(50,000 bytes\)"):
        load_adapter(copy.deepcopy(base), bad)
    monkeypatch.undo()
    assert load_adapter(copy.deepcopy(base), bad).budget == 128


def test_a_failure_midway_through_a_restore_is_rolled_back(saved_adapter, monkeypatch):
    "Valid adapter, but the second layer's restore fails (say, out of memory): the handle is put back as it was."
    base, h, folder = saved_adapter
    live = _live(base)
    before = _everything(live)
    opt_params = [p for g in live.optimizer.param_groups for p in g["params"]]
    real, calls = checkpoint.prune_experts, []
    def prune_then_fail(lora, experts, optimizer=None):
        calls.append(lora)
        if len(calls) == 2: raise RuntimeError("out of memory")
        real(lora, experts, optimizer)
    monkeypatch.setattr(checkpoint, "prune_experts", prune_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        load_adapter_into(live, folder)
    assert len(calls) == 2 and _same(_everything(live), before)       # layer 0 had been restored
    assert all(a is b for a, b in zip(opt_params, [p for g in live.optimizer.param_groups for p in g["params"]]))
    assert set(map(id, live.optimizer.state)) == set(map(id, opt_params)) & set(before["state"])
    monkeypatch.undo()
    load_adapter_into(live, folder)                                    # and it still takes a good load afterwards
    assert torch.equal(live.ranks, h.ranks)
    live.model.train()
    ids = torch.randint(3, 256, (2, 12))
    live.model(input_ids=ids, labels=ids).loss.backward(); live.optimizer.step()


def test_restore_adapter_checks_what_it_is_given(saved_adapter):
    "restore_adapter is public: it checks its arguments itself, against the handle too."
    base, h, folder = saved_adapter
    meta, tensors = checkpoint.read_adapter(folder)
    live = _live(base)
    before = _everything(live)
    for edit, message in [(lambda m, t: t["layers.0.gate_proj.A"].fill_(math.nan), "holds NaN"),
                          (lambda m, t: _set_rank(m, t, 0, 1, -3), "is -3"),
                          (lambda m, t: _set(m, "budget", 512), "budget 512")]:
        m, t = copy.deepcopy(meta), {k: v.clone() for k, v in tensors.items()}
        edit(m, t)
        with pytest.raises(InvalidAdapterError, match=message): checkpoint.restore_adapter(live, m, t)
        assert _same(_everything(live), before)
    down = epng.attach(copy.deepcopy(base), epng.EPnGConfig(targets=("down_proj",)))
    with pytest.raises(epng.EPnGError, match=r"adapts \['gate_proj', 'up_proj'\], this handle \['down_proj'\]"):
        checkpoint.restore_adapter(down, meta, tensors)


# --- peft export ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,targets", [("olmoe", ("gate_proj", "up_proj")),
                                          ("olmoe", ("gate_proj",)),
                                          ("olmoe", ("up_proj",)),
                                          ("olmoe", ("down_proj",)),
                                          ("olmoe", ("gate_proj", "up_proj", "down_proj")),
                                          ("qwen2_moe", ("gate_proj", "up_proj")),
                                          ("qwen2_moe", ("up_proj", "down_proj"))])
def test_peft_export_matches(tmp_path, arch, targets):
    base = _base(arch)
    h, ids = _trained(base, targets)
    expected = _logits(h.model, ids)
    export_peft(h, tmp_path / "p", base_model_name_or_path="tiny/base")
    config = json.loads((tmp_path / "p/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny/base"
    n_gate_up = len([t for t in targets if t != "down_proj"])
    for l, R in enumerate([10, 17]):
        if n_gate_up: assert config["rank_pattern"][f"model.layers.{l}.mlp.experts.gate_up_proj"] == n_gate_up * R
        if "down_proj" in targets: assert config["rank_pattern"][f"model.layers.{l}.mlp.experts.down_proj"] == R
    assert config["rank_pattern"] == config["alpha_pattern"]    # peft's scaling is 1: epng's is folded into B

    fresh = copy.deepcopy(base)
    shared_before = {n: p.clone() for n, p in fresh.named_parameters() if "shared_expert" in n}
    pm = peft.PeftModel.from_pretrained(fresh, tmp_path / "p")
    wrapped = [(n, m) for n, m in pm.named_modules() if type(m).__name__ == "ParamWrapper"]
    assert len(wrapped) == 2 * (bool(n_gate_up) + ("down_proj" in targets))
    for n, m in wrapped:   # each layer and parameter keeps its own rank r' (rank_pattern applied), scaling 1
        R = [10, 17][int(n.split("layers.")[1].split(".")[0])]
        assert m.r["default"] == (n_gate_up * R if m.parameter_name == "gate_up_proj" else R), n
        assert m.scaling["default"] == 1.0
    got = _logits(pm, ids)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - _logits(base, ids)).abs().max().item() > 1e-3      # the adapter does change the outputs
    names = [n for n, _ in pm.named_parameters() if "lora_" in n]
    assert names and not any("shared" in n for n in names)
    assert (arch == "qwen2_moe") == bool(shared_before)
    for n, p in pm.named_parameters():
        if "shared_expert" in n and "lora" not in n:
            key = n.removeprefix("base_model.model.")
            assert torch.equal(p, shared_before[key]), n


def test_peft_file_layout(tmp_path):
    "Expert-major lora_A, expert-minor lora_B, gate/up blocks on the diagonal of each expert's B'."
    base = _base()
    h, _ = _trained(base)
    export_peft(h, tmp_path / "p")
    weights = load_file(tmp_path / "p/adapter_model.safetensors")
    key_a = "base_model.model.model.layers.1.mlp.experts.lora_A.weight"
    lora_a, lora_b = weights[key_a], weights[key_a.replace("lora_A", "lora_B")]
    R, E, I = 17, 8, 32
    assert lora_a.shape == (E * 2 * R, 64) and lora_b.shape == (2 * I, 2 * R * E)
    a, b = from_peft_layout(lora_a, lora_b, E)
    s = h.loras[1].scaling
    e = 5                                                                                # rank R = 17
    (ga, gb), (_, ub) = h.factors(1, e, "gate_proj"), h.factors(1, e, "up_proj")
    assert torch.equal(lora_a[e * 2 * R:e * 2 * R + R], ga)                             # expert-major rows
    assert torch.equal(lora_b[:I, 0 * E + e], s * gb[:, 0])                             # column k·E + e
    assert torch.equal(b[e][:I, :R], s * gb)
    assert torch.equal(b[e][I:, R:], s * ub)
    assert b[e][:I, R:].abs().sum() == 0 and b[e][I:, :R].abs().sum() == 0              # block-diagonal
    assert a[0].abs().sum() == 0 and b[0].abs().sum() == 0                               # pruned expert (1, 0)
    r8 = int(h.ranks[1, 1])
    assert a[1, r8:R].abs().sum() == 0 and b[1][:, r8:R].abs().sum() == 0                # zero padding past rank


def test_peft_export_of_a_fully_pruned_layer(tmp_path):
    base = _base()
    h = epng.attach(copy.deepcopy(base))
    for e in range(8): h.prune(0, e)
    ids = torch.randint(3, 256, (1, 8))
    export_peft(h, tmp_path / "p")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    assert (_logits(pm, ids) - _logits(h.model, ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe"])
def test_merged_model_saves_and_loads_as_plain_transformers(tmp_path, arch):
    h, ids = _trained(_base(arch))
    h.merged_model().save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not [n for n in loaded.state_dict() if "epng" in n]
    torch.testing.assert_close(_logits(loaded, ids), _logits(h.model, ids), rtol=1e-5, atol=1e-5)


def test_slots_past_the_rank_limit_are_capped_and_still_save_a_loadable_adapter(tmp_path):
    "A layer_capacity asking for more slots than the experts can use stops at E × their rank limit."
    from epng.nano import load_nano
    model, _ = load_nano()
    handle = epng.attach(copy.deepcopy(model), epng.EPnGConfig(rank=8, layer_capacity=64))
    limit = min(min(shape) for shape in handle.loras[0].shapes.values())
    assert handle.loras[0].num_slots == handle.loras[0].num_experts * limit
    save_adapter(handle, tmp_path / "a")
    assert load_adapter(copy.deepcopy(model), tmp_path / "a").loras[0].num_slots == handle.loras[0].num_slots


def test_an_adapter_read_with_another_importance_is_refused(tmp_path):
    "Statistics gathered as 'selection' cannot resume a run that reads 'gate': the adapter says which it used."
    from epng.nano import load_nano
    model, _ = load_nano()
    save_adapter(epng.attach(copy.deepcopy(model), epng.EPnGConfig(importance="selection")), tmp_path / "a")
    handle = epng.attach(copy.deepcopy(model), epng.EPnGConfig())
    with pytest.raises(epng.EPnGError, match="importance: adapter 'selection', handle 'gate'"):
        epng.load_adapter_into(handle, tmp_path / "a")
    assert epng.load_adapter(copy.deepcopy(model), tmp_path / "a").config.importance == "selection"


def test_write_safetensors_writes_tensors_that_share_storage(tmp_path):
    "Tied weights, a slice of them and a transposed view: safetensors refuses shared storage; each is written as its own."
    from epng.io import write_safetensors
    w = torch.arange(12.0).view(3, 4)
    tensors = {"embed": w, "head": w, "row": w[1], "t": w.t()}
    write_safetensors(tensors, tmp_path / "t.safetensors")
    back = load_file(tmp_path / "t.safetensors")
    assert all(back[k].equal(v) for k, v in tensors.items())


def test_an_adapter_saved_before_the_knob_rename_loads_the_same(saved_adapter, tmp_path):
    "epng 0.1 wrote alpha, beta, interval, decay in the adapter's config: it loads with no warning, the same config."
    import warnings
    from epng.compat import RENAMED_KNOBS
    base, h, folder = saved_adapter
    old = {new: old for old, new in RENAMED_KNOBS.items()}
    def rename(meta): meta["config"] = {old.get(k, k): v for k, v in meta["config"].items()}
    copy_ = _edit(folder, tmp_path / "old", meta=rename)
    assert "alpha" in json.loads((copy_ / ADAPTER_CONFIG).read_text())["config"]
    live = _live(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # a file is not the reader's code: nothing to warn about
        load_adapter_into(live, copy_)
    assert live.config == h.config and torch.equal(live.ranks, h.ranks)
    both = _edit(folder, tmp_path / "both", meta=lambda m: m["config"].update(alpha=0.3))
    with pytest.raises(InvalidAdapterError, match="give only 'prune_ratio'"): load_adapter_into(_live(base), both)
