"MoE layers of different sizes: attach, a budget counted in parameters, exact trainable counts, cycles, resume, export."
import copy, importlib, json
import pytest
import torch
from transformers import AutoModelForCausalLM
import epng
from epng.moe import UnsupportedExpertsError
from epng.selection import CyclePlan
from epng.loop import EPnGController, check_ranks, restore_ranks, slot_owners

# peft 0.21 checks rank_pattern keys against module names only, so it warns about patterns it does apply
pytestmark = pytest.mark.filterwarnings("ignore:.*_pattern keys did not match any targeted module")


def rebuild_moe_block(model, layer: int, **sizes):
    """Give decoder layer `layer` a fresh MoE block of the model's own class with other `sizes` (config fields, e.g.
    intermediate_size=16): OLMoE's modeling reads one size for all layers, so a model whose layers differ is built
    by constructing that block. Its experts keep reading `model.config` for the experts implementation."""
    config = copy.deepcopy(model.config)
    for k, v in sizes.items(): setattr(config, k, v)
    block = type(model.model.layers[layer].mlp)(config)
    block.apply(model._init_weights)
    block.experts.config = model.config
    model.model.layers[layer].mlp = block
    return model


def mixed_model(intermediate_size: int = 16):
    "A tiny OLMoE (2 MoE layers × 8 experts, H 64) whose layer 0 has experts of width 32 and layer 1 of `intermediate_size`."
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(epng.tiny_moe_config("olmoe"))
    return rebuild_moe_block(model, 1, intermediate_size=intermediate_size)


def live_parameters(handle) -> int:
    "Parameters of the live factors, counted from the slots themselves: each owned slot is one row of every A and B."
    return sum(int((lora.slot_owner >= 0).sum()) * sum(lora.A[t].shape[1] + lora.B[t].shape[1] for t in lora.shapes)
               for lora in handle.loras)


def train(model, handle, steps: int, controller=None, start: int = 1, opt=None):
    "`steps` AdamW steps on fixed ids; the controller (if any) runs its cycles; returns the optimizer and the records."
    ids = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(5))
    opt = opt or torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)
    handle.bind_optimizer(opt)
    model.train()
    records = []
    for step in range(start, start + steps):
        model(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
        if controller is not None and (r := controller.step_end(step, opt)) is not None: records.append(r)
    return opt, records


def test_attach_counts_the_budget_in_parameters():
    model = mixed_model()
    h = epng.attach(model, epng.EPnGConfig(rank=4))
    costs = [2 * (64 + 32), 2 * (64 + 16)]                     # gate + up: 2 (H + I_l) per rank
    assert h.rank_costs == costs
    assert h.budget == 4 * 8 * sum(costs) == h.num_trainable() == live_parameters(h)
    assert h.max_ranks == [32, 16] and h.max_rank == 16             # each layer's own min(H, I)
    assert [lora.shapes["up_proj"] for lora in h.loras] == [(64, 32), (64, 16)]
    assert "parameters" in repr(h)


def test_layers_of_one_size_keep_counting_ranks(tiny):
    h = epng.attach(tiny(), epng.EPnGConfig(rank=4))
    assert h.rank_costs is None and h.budget == int(h.ranks.sum()) == 2 * 8 * 4
    assert h.max_ranks == [32, 32]


def test_merged_model_matches_on_both_widths():
    model = mixed_model()
    h = epng.attach(model, epng.EPnGConfig(rank=4))
    train(model, h, 3)
    assert all(lora.B["up_proj"].detach().abs().sum() > 0 for lora in h.loras)   # both layers' LoRA is trained
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(9))
    model.eval()
    with torch.no_grad(): ours, merged = model(input_ids=ids).logits, h.merged_model()(input_ids=ids).logits
    torch.testing.assert_close(ours, merged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("targets", [("gate_proj", "up_proj"), ("gate_proj", "up_proj", "down_proj")])
def test_cycles_never_exceed_the_budget_and_the_count_stays_exact(targets):
    model = mixed_model()
    h = epng.attach(model, epng.EPnGConfig(rank=4, targets=targets, warmup_steps=2, cycle_interval=1, max_rank=12))
    costs = h.rank_costs
    controller = EPnGController(h, "epng", max_steps=9)
    _, records = train(model, h, 9, controller)
    assert len(records) == 7
    moved = False
    for r in records:
        spent = int((torch.tensor(costs)[:, None] * r.ranks).sum())
        assert h.budget - max(costs) < spent <= h.budget                 # never over; less than one wide rank short
        moved |= r.ranks.sum(1).tolist() != [4 * 8, 4 * 8]              # ranks crossed between the layers
        assert (r.ranks <= torch.tensor(h.max_ranks)[:, None]).all()
    assert moved
    assert h.num_trainable() == live_parameters(h) == h.budget_used() <= h.budget
    assert sum(p.numel() for p in h.parameters()) >= h.budget           # the slots hold the budget
    for lora in h.loras: assert int(lora.ranks.sum()) <= lora.num_slots


def test_ranks_cross_between_layers_at_their_own_price():
    model = mixed_model()
    h = epng.attach(model, epng.EPnGConfig(rank=4))
    # an importance that prunes only wide experts and grows only narrow ones
    h.importance.sums.copy_(torch.tensor([[0.01] * 8, [1.0] * 8]) + torch.arange(8) * 1e-3)
    h.importance.counts.fill_(1)
    plan = h.plan()
    wide, narrow = h.rank_costs
    assert plan.pruned[0].any() and not plan.pruned[1].any() and not plan.grown[0].any()
    freed = int(plan.ranks_before[plan.pruned].sum()) * wide
    assert int(plan.added.sum()) == freed // narrow                        # each wide rank buys wide / narrow narrow ranks
    h.apply(plan)
    assert h.budget - narrow < h.num_trainable() <= h.budget


def test_static_and_ablations_on_mixed_layers():
    model = mixed_model()
    h = epng.attach(model, epng.EPnGConfig(rank=4, warmup_steps=2, cycle_interval=2))
    _, records = train(model, h, 5, EPnGController(h, "prune_only", max_steps=5))
    assert records and all(int((torch.tensor(h.rank_costs)[:, None] * r.ranks).sum()) < h.budget for r in records)
    check_ranks(h, h.ranks, slot_owners(h), "prune_only")
    with pytest.raises(epng.EPnGError, match="parameters, but a epng run keeps its budget"):
        check_ranks(h, h.ranks, slot_owners(h), "epng")


def test_resume_from_ranks_slots_and_controller_state_is_exact():
    base = mixed_model()
    config = epng.EPnGConfig(rank=4, warmup_steps=2, cycle_interval=2, max_rank=12)
    # one run of 8 steps
    model = copy.deepcopy(base); h = epng.attach(model, config)
    c = EPnGController(h, "epng", max_steps=8, seed=3)
    opt, _ = train(model, h, 4, c)
    saved = dict(ranks=h.ranks.clone(), owners=slot_owners(h).clone(), controller=copy.deepcopy(c.state_dict()),
                 factors=copy.deepcopy([lora.state_dict() for lora in h.loras]), opt=copy.deepcopy(opt.state_dict()))
    train(model, h, 4, c, start=5, opt=opt)
    # the same run stopped after step 4 and resumed
    model2 = copy.deepcopy(base); h2 = epng.attach(model2, config)
    restore_ranks(h2, saved["ranks"], saved["owners"], "epng")
    for lora, state in zip(h2.loras, saved["factors"]): lora.load_state_dict(state)
    opt2 = torch.optim.AdamW(h2.parameters(), lr=1e-2, weight_decay=0.1); opt2.load_state_dict(saved["opt"])
    c2 = EPnGController(h2, "epng", max_steps=8, seed=3); c2.load_state_dict(saved["controller"])
    train(model2, h2, 4, c2, start=5, opt=opt2)
    assert torch.equal(h2.ranks, h.ranks) and h2.budget == h.budget
    for a, b in zip(h.parameters(), h2.parameters()): torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_check_ranks_follows_each_layer():
    h = epng.attach(mixed_model(), epng.EPnGConfig(rank=4))
    ranks, owners = h.ranks.clone(), slot_owners(h)
    bad = ranks.clone(); bad[1, 0] = 17                                 # past the narrow layer's min(H, I) = 16
    with pytest.raises(epng.EPnGError, match="0..32/16 by MoE layer"): check_ranks(h, bad, owners, "epng")
    more = ranks.clone(); more[0, 0] += 1                              # one wide rank over the budget
    with pytest.raises(epng.EPnGError, match="parameters, but a epng run keeps its budget"):
        check_ranks(h, more, owners, "epng")


def test_layers_with_different_slot_counts_save_padded_owners():
    # max_rank 2 caps the narrow layer's slots at E · 2 = 16, the wide one's at capacity 2 · E · r0 = 32
    torch.manual_seed(0)
    model = rebuild_moe_block(AutoModelForCausalLM.from_config(epng.tiny_moe_config("olmoe")), 1, intermediate_size=2)
    h = epng.attach(model, epng.EPnGConfig(rank=2))
    assert [lora.num_slots for lora in h.loras] == [32, 16]
    owners = slot_owners(h)
    assert owners.shape == (2, 32) and (owners[1, 16:] == -1).all()
    restore_ranks(h, h.ranks, owners, "epng")
    bad = owners.clone(); bad[1, 20] = 0
    with pytest.raises(epng.EPnGError, match="slot owners"): check_ranks(h, h.ranks, bad, "epng")


def test_refusals_name_their_reason():
    torch.manual_seed(0)
    fewer = rebuild_moe_block(AutoModelForCausalLM.from_config(epng.tiny_moe_config("olmoe")), 1, num_experts=4)
    with pytest.raises(UnsupportedExpertsError, match="different numbers of experts.*model.layers.1.mlp: 4"):
        epng.attach(fewer)
    with pytest.raises(epng.EPnGError, match=r"allow \(16 in model.layers.1.mlp\)"):
        epng.attach(mixed_model(), epng.EPnGConfig(rank=20, max_rank=20))
    h = epng.attach(mixed_model(), epng.EPnGConfig(rank=4))
    with pytest.raises(epng.EPnGError, match="passes max_rank=16"): h.grow(1, 0, 13)
    h.grow(0, 0, 13)                                                    # the wide layer allows it
    added = torch.zeros_like(h.ranks); added[1, 1] = 13
    plan = CyclePlan(torch.zeros_like(h.ranks, dtype=torch.bool), added, float("nan"), float("nan"), h.ranks)
    with pytest.raises(epng.EPnGError, match="max_rank=16 in MoE layer 1"): h.apply(plan)


def test_ernie_vl_text_and_vision_experts():
    "ERNIE-4.5-VL: text experts (I 32 here) and vision experts (I 16) in one decoder layer, routed by token type."
    cfgs = pytest.importorskip("transformers.models.ernie4_5_vl_moe.configuration_ernie4_5_vl_moe")
    modeling = pytest.importorskip("transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe")
    torch.manual_seed(0)
    config = cfgs.Ernie4_5_VLMoeTextConfig(
        vocab_size=256, hidden_size=256, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, moe_intermediate_size=[32, 16], moe_num_experts=8, moe_k=2, moe_num_shared_experts=1,
        max_position_embeddings=256, pad_token_id=0)   # head_dim 128: the default 3-D rope sections need it
    model = modeling.Ernie4_5_VLMoeTextModel(config)
    h = epng.attach(model, epng.EPnGConfig(rank=4))
    assert h.rank_costs == [2 * (256 + 32), 2 * (256 + 16)] and h.budget == h.num_trainable() == live_parameters(h)
    ids = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    vision = (torch.arange(8) >= 5).int().expand(2, 8)                  # the last three tokens of each row are "image"
    opt = torch.optim.AdamW(h.parameters(), lr=1e-2); h.bind_optimizer(opt)
    model.train()
    for _ in range(2):
        (model(input_ids=ids, moe_mm_token_type_ids=vision).last_hidden_state ** 2).mean().backward()
        opt.step(); opt.zero_grad()
    for _ in range(3):
        h.cycle()
        assert h.budget - max(h.rank_costs) < h.num_trainable() == live_parameters(h) <= h.budget


def test_peft_export_of_mixed_layers_reloads_to_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    base = mixed_model()
    model = copy.deepcopy(base)
    h = epng.attach(model, epng.EPnGConfig(rank=4))
    train(model, h, 2); h.grow(1, 2, 3); h.prune(0, 1)                  # per-expert ranks differ in both layers
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(9))
    model.eval()
    with torch.no_grad(): ours = model(input_ids=ids).logits
    epng.export_peft(h, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad(): theirs = loaded(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_adapter_save_and_load_of_mixed_layers(tmp_path):
    base = mixed_model()
    model = copy.deepcopy(base)
    h = epng.attach(model, epng.EPnGConfig(rank=4))
    train(model, h, 2); h.cycle()
    epng.save_adapter(h, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "epng_adapter.json").read_text())
    assert meta["layer_sizes"] == [[64, 32], [64, 16]] and meta["budget"] == h.budget == 4 * 8 * sum(h.rank_costs)
    h2 = epng.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert torch.equal(h2.ranks, h.ranks) and h2.budget == h.budget and h2.rank_costs == h.rank_costs
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(9))
    model.eval(); h2.model.eval()
    with torch.no_grad(): assert torch.equal(h2.model(input_ids=ids).logits, model(input_ids=ids).logits)
    h3 = epng.attach(copy.deepcopy(base), epng.EPnGConfig(rank=4))       # resuming into an attached handle
    epng.load_adapter_into(h3, tmp_path / "a")
    assert torch.equal(h3.ranks, h.ranks) and h3.budget == h.budget
    narrower = mixed_model(intermediate_size=8)                          # layer 0 alike, layer 1 narrower
    with pytest.raises(epng.EPnGError, match=r"layer sizes: adapter \[\[64, 32\], \[64, 16\]\], model \[\[64, 32\], \[64, 8\]\]"):
        epng.load_adapter(narrower, tmp_path / "a")


def test_one_size_adapters_keep_their_json_and_fingerprint(tiny, tmp_path):
    from epng.checkpoint import moe_shapes
    h = epng.attach(tiny(), epng.EPnGConfig(rank=4))
    assert "layer_sizes" not in moe_shapes(h.layers)
    meta = json.loads((epng.save_adapter(h, tmp_path / "a") / "epng_adapter.json").read_text())
    assert "layer_sizes" not in meta and meta["budget"] == int(h.ranks.sum())


@pytest.mark.parametrize("edit, reason", [
    (lambda m: m.update(layer_sizes=[[64, 32]]), "layer_sizes must be 2 pairs"),                     # wrong length
    (lambda m: m.update(layer_sizes=[[64, 32], [64, 16.5]]), "layer_sizes must be 2 pairs"),         # not whole
    (lambda m: m.update(layer_sizes=[[64, 32], [64, True]]), "layer_sizes must be 2 pairs"),
    (lambda m: m.update(layer_sizes=[[64, 32], [64, "16"]]), "layer_sizes must be 2 pairs"),
    (lambda m: m.update(layer_sizes=[[64, 32], 16]), "layer_sizes must be 2 pairs"),
    (lambda m: m.update(layer_sizes={"0": [64, 32]}), "layer_sizes must be 2 pairs"),
    (lambda m: m.update(layer_sizes=[[64, 32], [10**9, 10**9]]), "whole numbers in 1..1048576"),      # huge
    (lambda m: m.update(layer_sizes=[[64, 32], [64, 0]]), "whole numbers in 1..1048576"),
    (lambda m: m.update(layer_sizes=[[64, 8], [64, 16]]), "first equal to hidden_size and intermediate_size"),
    (lambda m: m.update(layer_sizes=None), "layer_sizes must be 2 pairs"),
    (lambda m: m.update(layer_sizes=[[64, 32], [64, 32]]), r"budget 11264 is not a whole number in 1..64,"),  # one size
    (lambda m: m.update(budget=m["budget"] + 1), r"not a whole number in 1..11264 parameters.*\(192 \+ 160\)"),
    (lambda m: m["slots"].__setitem__(1, 129), r"slots must be 2 whole numbers in 1..256/128 by MoE layer"),
])
def test_damaged_layer_sizes_are_refused_before_anything_is_allocated(tmp_path, monkeypatch, edit, reason):
    base = mixed_model()
    h = epng.attach(copy.deepcopy(base), epng.EPnGConfig(rank=4))
    folder = epng.save_adapter(h, tmp_path / "a")
    meta = json.loads((folder / "epng_adapter.json").read_text())
    edit(meta)
    (folder / "epng_adapter.json").write_text(json.dumps(meta))
    model = copy.deepcopy(base)
    def no_attach(*args, **kwargs): raise AssertionError("attached before the adapter was checked")
    monkeypatch.setattr(epng.checkpoint, "attach", no_attach)
    with pytest.raises(epng.EPnGError, match=reason): epng.load_adapter(model, folder)
    assert not any(hasattr(m, "epng_lora") for m in model.modules())


# ---------------------------------------------------------------- the other callers: training, methods, repro, workshop
def mixed_nano(dtype=torch.float32):
    "The embedded nano OLMoE (4 MoE layers × 16 experts, H 128, I 64) with layer 3's experts half as wide (I 32)."
    from epng.nano import load_nano
    model, tokenizer = load_nano(dtype=dtype)
    with torch.random.fork_rng():                         # the same block every time, whatever the run's RNG
        torch.manual_seed(0)
        rebuild_moe_block(model, 3, intermediate_size=32)
    return model.to(dtype), tokenizer


@pytest.fixture
def mixed_embedded(monkeypatch):
    "`epng.train` with model 'embedded' trains `mixed_nano`: OLMoE's from_pretrained reads one width for all layers."
    T = importlib.import_module("epng.train")
    monkeypatch.setattr(T, "load_model_and_tokenizer", lambda name, bf16=False, device=None: mixed_nano())
    return T


def test_train_runs_epng_on_mixed_layers_and_resumes_exactly(mixed_embedded, tmp_path):
    T = mixed_embedded
    small = dict(max_steps=10, warmup_steps=4, cycle_interval=4, limit=32, batch_size=4, rank=4)
    full = T.train(T.TrainArgs(**small, save_steps=2, output_dir=str(tmp_path / "full")), progress=False)
    h = full["tuner"]
    assert h.rank_costs == [2 * (128 + 64)] * 3 + [2 * (128 + 32)] and h.budget == 4 * 16 * sum(h.rank_costs)
    assert [r.step for r in full["controller"].history] == [4, 8]
    for r in full["controller"].history:
        assert h.budget - max(h.rank_costs) < h.budget_used(r.ranks) <= h.budget
    meta = json.loads((tmp_path / "full" / "checkpoint-6" / "adapter" / "epng_adapter.json").read_text())
    assert meta["layer_sizes"][3] == [128, 32] and meta["budget"] == h.budget
    resumed = T.train(T.TrainArgs(**small, save_steps=2, resume=str(tmp_path / "full" / "checkpoint-6"),
                                  output_dir=str(tmp_path / "resumed")), progress=False)
    assert resumed["losses"] == full["losses"] and torch.equal(resumed["tuner"].ranks, h.ranks)
    for a, b in zip(h.parameters(), resumed["tuner"].parameters()): assert torch.equal(a, b)
    repro = pytest.importorskip("epng.repro")
    assert repro.budget_exact(full)


def test_resume_refuses_a_mixed_adapter_whose_parameters_left_the_budget(mixed_embedded):
    T = mixed_embedded
    h = epng.attach(mixed_nano()[0], epng.EPnGConfig(rank=4))
    meta = epng.checkpoint.adapter_metadata(h)
    assert T.budget_not_kept(meta, "epng") is None and T.budget_not_kept(meta, "static") is None
    meta["ranks"][3][0] -= 1                               # one narrow rank short: an EPnG remainder, not static LoRA's
    assert T.budget_not_kept(meta, "epng") is None
    assert "spend 93888 parameters, but static keeps them at the budget 94208" in T.budget_not_kept(meta, "static")
    meta["ranks"][0][0] -= 2                               # two wide ranks short: more than a remainder
    assert "but epng keeps them at the budget" in T.budget_not_kept(meta, "epng")


def test_check_cycles_fit_plans_as_the_handle_does(mixed_embedded):
    T = mixed_embedded
    model = mixed_nano()[0]
    h = epng.attach(model, epng.EPnGConfig(rank=8))
    T.check_cycles_fit(h, T.TrainArgs(max_steps=10, warmup_steps=4, cycle_interval=4, rank=8))
    # max_rank 8 leaves the survivors no room: the freed parameters cannot be placed
    tight = epng.attach(mixed_nano()[0], epng.EPnGConfig(rank=8, max_rank=8))
    with pytest.raises(epng.EPnGError, match=r"the 52 left cannot hold the budget of 188416 parameters \(rank 8 on every expert\) under each MoE layer.s max_rank \(8/8/8/8\)"):
        T.check_cycles_fit(tight, T.TrainArgs(max_steps=10, warmup_steps=4, cycle_interval=4, rank=8, max_rank=8))


def test_sieve_budget_counts_the_kept_experts_parameters():
    from epng.methods import attach_sieve
    selected = torch.zeros(2, 8, dtype=torch.bool); selected[:, :2] = True; selected[1, 2] = True
    h = attach_sieve(mixed_model(), selected, epng.EPnGConfig(rank=4))
    assert h.budget == 4 * (2 * 192 + 3 * 160) == h.num_trainable() == h.budget_used()
    check_ranks(h, h.ranks, slot_owners(h), "static")                  # a sieve run keeps it, as static LoRA does


def test_dr_lora_grows_each_layer_by_its_quota_in_its_own_ranks():
    from epng.methods import DRLoRAController, dr_lora_config
    model = mixed_model()
    config = dr_lora_config(epng.EPnGConfig(rank=2, warmup_steps=2, cycle_interval=2, targets=("up_proj", "down_proj")))
    h = epng.attach(model, config)
    assert h.max_ranks == [8, 8] and h.budget == 2 * 8 * sum(h.rank_costs)
    c = DRLoRAController(h, max_steps=9)
    _, records = train(model, h, 9, c)
    assert len(records) == 4
    assert h.ranks.sum(1).tolist() == [8 * 4, 8 * 4]                    # r_target 4 on average in every layer
    assert int(h.ranks.max()) <= 8 and h.budget_used() > h.budget
    check_ranks(h, h.ranks, slot_owners(h), "grow_only")
    assert h.num_trainable() == live_parameters(h) == h.budget_used()


def test_the_workshops_cycle_exercise_refuses_mixed_layers():
    from epng.workshop import check_one_cycle, solution_one_cycle
    h = epng.attach(mixed_model(), epng.EPnGConfig(rank=4))
    with pytest.raises(epng.EPnGError, match="budget counts parameters.*handle.cycle"):
        check_one_cycle(solution_one_cycle, h, torch.rand(h.ranks.shape))
