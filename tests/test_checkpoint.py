"Adapters on disk: atomic writes, exact save/load, clear errors, and peft export that peft itself loads."
import copy, json
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
import epng
from epng.checkpoint import (atomic_dir, atomic_save_torch, atomic_write_json, save_adapter, load_adapter,
                             load_adapter_into, export_peft, from_peft_layout, ADAPTER_CONFIG, ADAPTER_WEIGHTS)

peft = pytest.importorskip("peft")
# peft 0.21 checks rank_pattern keys against module names only, so it warns about patterns it does apply
pytestmark = pytest.mark.filterwarnings("ignore:.*_pattern keys did not match any targeted module")


def _base(arch="olmoe", **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(epng.tiny_moe_config(arch, **overrides))


def _trained(base, targets=("gate_proj", "up_proj"), steps=3):
    "A handle on a copy of `base` with skewed ranks (pruned, grown past capacity) and trained, non-zero B."
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
    atomic_save_torch({"w": torch.arange(3)}, tmp_path / "opt.pt")
    atomic_write_json({"step": 1}, tmp_path / "state.json")
    with pytest.raises(Exception):
        atomic_save_torch({"f": lambda: 0}, tmp_path / "opt.pt")  # a lambda cannot be pickled: fails mid-save
    with pytest.raises(TypeError):
        atomic_write_json({"x": object()}, tmp_path / "state.json")
    assert torch.equal(torch.load(tmp_path / "opt.pt")["w"], torch.arange(3))
    assert json.loads((tmp_path / "state.json").read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt.pt", "state.json"]


def test_atomic_dir_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(epng.EPnGError, match="is a file"):
        with atomic_dir(tmp_path / "f"): pass


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
    assert meta["model"]["model_type"] == arch and meta["capacity"] == [16, 24]
    tensors = load_file(tmp_path / "a" / ADAPTER_WEIGHTS)
    assert tensors[f"layers.1.{targets[0]}.A"].shape[1] == 17   # trimmed to the layer's largest rank, not capacity

    h2 = load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert h2.config == h.config and torch.equal(h2.ranks, h.ranks) and h2.budget == h.budget
    assert [l.capacity for l in h2.loras] == [l.capacity for l in h.loras]
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
    h2.grow(1, 5, 8)   # 17 + 8 = 25 > capacity 24: capacity grows again after a load
    assert h2.loras[1].capacity == 32 and int(h2.ranks[1, 5]) == 25
    assert h2.loras[0].B["gate_proj"][0, :, 3].abs().sum() > 0 and h2.loras[0].A["up_proj"][3].abs().sum() == 0


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
    lora, s = h.loras[1], h.loras[1].scaling
    e = 5
    assert torch.equal(lora_a[e * 2 * R:e * 2 * R + R], lora.A["gate_proj"][e, :R])     # expert-major rows
    assert torch.equal(lora_b[:I, 0 * E + e], s * lora.B["gate_proj"][e, :, 0])          # column k·E + e
    assert torch.equal(b[e][:I, :R], s * lora.B["gate_proj"][e, :, :R])
    assert torch.equal(b[e][I:, R:], s * lora.B["up_proj"][e, :, :R])
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
