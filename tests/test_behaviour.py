"End-to-end behaviour of the building blocks on small real-architecture models."
import copy, subprocess, sys
import pytest
import torch
import epng


def _train(model, h, steps, ids, opt=None):
    "`steps` AdamW steps on `ids`; a new optimizer (bound to the handle) unless `opt` is given."
    if opt is None:
        opt = torch.optim.AdamW(h.parameters(), lr=1e-2, weight_decay=0.1)
        h.bind_optimizer(opt)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward(); opt.step(); opt.zero_grad()
        losses.append(loss.item())
    return opt, losses


def test_padding_does_not_count(tiny):
    model = tiny()
    h = epng.attach(model)
    model.train()
    ids = torch.randint(3, 256, (1, 10))
    model(input_ids=ids[:, :7])
    unpadded = h.importance.state_dict()
    h.importance.decay(0.0)
    padded = torch.cat([ids[:, :7], torch.zeros(1, 3, dtype=torch.long)], 1)
    model(input_ids=padded, attention_mask=torch.tensor([[1] * 7 + [0] * 3]))
    assert torch.equal(h.importance.counts, unpadded["counts"])
    torch.testing.assert_close(h.importance.sums, unpadded["sums"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_counts_once(tiny, reentrant):
    model = tiny()
    h = epng.attach(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    model.train()
    ids = torch.randint(3, 256, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    assert h.importance.counts.tolist() == [12.0, 12.0]
    assert all(p.grad is not None for p in h.parameters())


def test_generate_and_eval_leave_statistics_alone(tiny):
    model = tiny()
    h = epng.attach(model)
    model.eval()
    out = model.generate(torch.randint(3, 256, (2, 4)), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7)
    assert h.importance.counts.sum() == 0


def test_bf16_model_keeps_fp32_factors(tiny):
    model = tiny()
    ref = copy.deepcopy(model)
    h = epng.attach(model.to(torch.bfloat16))
    epng.attach(ref)
    assert all(p.dtype == torch.float32 for p in h.parameters())
    ids = torch.randint(3, 256, (2, 8))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in h.parameters())
    with torch.no_grad():
        diff = (model(input_ids=ids).logits.float() - ref(input_ids=ids).logits).abs().max()
    assert diff < 0.1  # bf16 rounding only


def test_pruned_slots_stay_exactly_zero_under_adamw(tiny):
    model = tiny()
    h = epng.attach(model)
    ids = torch.randint(3, 256, (4, 12))
    _train(model, h, 3, ids)
    slots = h.loras[1].expert_slots()[4]
    h.prune(1, 4)
    _train(model, h, 5, ids)  # a new optimizer: fresh state, weight decay on
    for p in h.loras[1].parameters():
        assert p.detach()[slots].abs().sum() == 0 and p.detach()[h.loras[1].slot_owner < 0].abs().sum() == 0


def test_cycles_keep_budget_and_training_continues(tiny):
    model = tiny("qwen2_moe", num_experts=16)
    shared_before = copy.deepcopy(model.model.layers[0].mlp.shared_expert.state_dict())
    h = epng.attach(model, epng.EPnGConfig(rank=4, lora_alpha=8))
    budget, params = h.budget, h.num_trainable()
    ids = torch.randint(3, 256, (4, 16))
    opt, losses = _train(model, h, 4, ids)
    for _ in range(4):
        plan = h.cycle()
        assert int(plan.pruned.sum()) > 0 and int(plan.grown.sum()) > 0
        assert int(h.ranks.sum()) == budget and h.num_trainable() == params
        losses += _train(model, h, 3, ids, opt)[1]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    for k, v in model.model.layers[0].mlp.shared_expert.state_dict().items():
        assert torch.equal(v, shared_before[k])


def test_share_counting_agrees_with_the_handle(tiny):
    model = tiny("qwen3_moe")
    cfg = epng.EPnGConfig(rank=4, targets=("gate_proj", "up_proj", "down_proj"))
    share = epng.trainable_share(model.config, rank=4, targets=cfg.targets)
    total = sum(p.numel() for p in model.parameters())
    h = epng.attach(model, cfg)
    assert h.num_trainable() == round(share * total)


def test_merged_model_matches_and_is_plain(tiny):
    model = tiny("mixtral")
    h = epng.attach(model, epng.EPnGConfig(rank=4))
    ids = torch.randint(3, 256, (2, 8))
    _train(model, h, 3, ids)
    h.grow(0, 1, 5); h.prune(1, 2)
    merged = h.merged_model()
    model.eval(); merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert merged.config._experts_implementation == "grouped_mm"
    assert not [n for n in merged.state_dict() if "epng" in n]
    model.train(); model(input_ids=ids)  # the handle still collects after merging
    assert h.importance.counts.sum() > 0


def _full_width_copies(model, ids, width):
    "Copies or clones of a (rows × `width`) tensor during one forward + backward, counted by the profiler."
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(1 for e in prof.events() if e.name in ("aten::copy_", "aten::clone")
               and e.input_shapes and len(e.input_shapes[0]) == 2 and e.input_shapes[0][1] == width)


def test_per_target_adds_copy_no_gradient(tiny, monkeypatch):
    "LoRA's per-target B adds into gate_up's columns make no copy of the (rows × 2I) gradient (AddIntoColumns)."
    model = tiny(intermediate_size=48)                         # 2I = 96, unlike every other width in the model
    h = epng.attach(model)
    ids = torch.randint(3, 256, (2, 16))
    for lora in h.loras: lora.grouped_b = False
    assert _full_width_copies(model, ids, 96) == 0
    def autograd_slice_adds(out, cols, part, rows=None):       # the plain in-place add: the detector must see its copies
        out[:, cols].add_(part); return out
    monkeypatch.setattr(epng.lora.AddIntoColumns, "apply", autograd_slice_adds)
    assert _full_width_copies(model, ids, 96) > 0


def test_growth_into_lower_free_slots_keeps_rank_order_and_moves_optimizer_state(tiny):
    "A pruned expert frees slots below a grown expert's: its old ranks move down with their AdamW state, new ones follow."
    model = tiny()
    h = epng.attach(model)
    opt = torch.optim.AdamW(h.parameters(), lr=1e-2, weight_decay=0.1)
    h.bind_optimizer(opt)
    ids = torch.randint(3, 256, (4, 12))
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
    lora, params = h.loras[0], list(h.loras[0].parameters())
    old_slots = lora.expert_slots()[5]
    old = {t: h.factors(0, 5, t) for t in lora.shapes}
    state = [{k: v[old_slots].clone() for k, v in opt.state[p].items() if v.dim()} for p in params]
    h.prune(0, 1)                                           # frees slots 8..15, below expert 5's 40..47
    model.eval()
    with torch.no_grad(): before = model(input_ids=ids).logits
    h.grow(0, 5, 3)
    with torch.no_grad(): after = model(input_ids=ids).logits
    slots = lora.expert_slots()[5]
    assert slots[0] < old_slots[0] and len(slots) == 11
    assert (after - before).abs().max().item() <= 1e-6
    for t, (a, b) in old.items():
        a2, b2 = h.factors(0, 5, t)
        assert torch.equal(a2[:8], a) and torch.equal(b2[:, :8], b) and (b2[:, 8:] == 0).all()
        assert (a2[8:] @ a.T).abs().max() < 1e-5
    for p, saved in zip(params, state):                     # the old ranks' moments moved with them; new ones are zero
        for k, v in saved.items():
            assert torch.equal(opt.state[p][k][slots[:8]], v) and (opt.state[p][k][slots[8:]] == 0).all()
    assert all(p is q for p, q in zip(lora.parameters(), params))


def test_every_factor_gets_a_gradient_even_when_no_row_reaches_it(tiny):
    "DistributedDataParallel waits for a gradient of every trainable tensor: a fully pruned layer still yields zeros."
    model = tiny()
    h = epng.attach(model)
    for e in range(h.loras[0].num_experts): h.prune(0, e)
    ids = torch.randint(3, 256, (2, 8))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in h.parameters())
    assert all(float(p.grad.abs().sum()) == 0 for p in h.loras[0].parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in h.loras[1].parameters())
