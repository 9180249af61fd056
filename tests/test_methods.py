"MoE-Sieve and DR-LoRA (notebook 11b): the sieve's selection and budget, DR-LoRA's quota, growth, exact output and resume."
import copy, math
from dataclasses import replace
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from epng.moe import EPnGError, find_moe_layers
from epng.config import EPnGConfig
from epng.handle import attach
from epng.loop import EPnGController, check_ranks, slot_owners
from epng.methods import (DRLoRAController, MethodCallback, attach_sieve, deal_growth, dr_lora_config, dr_lora_schedule, growth_quota,
                          grow_step, make_controller, make_method_tuner, select_sieve_experts, sieve_counts, sieve_size)

L, E, K = 2, 8, 2   # the tiny OLMoE of conftest: 2 MoE layers × 8 experts, top-2


def _batches(n=3, seed=0, pad=0):
    "`n` batches of 2 random rows of 12 tokens; the second row of each ends in `pad` padding tokens."
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 256, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        if pad: ids[1, -pad:], mask[1, -pad:] = 0, 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _router_counts(model, batches):
    "Top-k selections per (layer, expert) over the real tokens, counted from the router logits the model returns."
    counts, was_training = torch.zeros(L, E), model.training
    model.eval()                                         # epng's collectors count training forwards only: not this one
    with torch.no_grad():
        for b in batches:
            out = model(**b, output_router_logits=True)
            real = b["attention_mask"].flatten().bool()
            for l, logits in enumerate(out.router_logits):
                counts[l] += torch.bincount(logits[real].topk(K, -1).indices.flatten(), minlength=E).float()
    model.train(was_training)
    return counts


def test_sieve_keeps_the_top_quarter_by_an_independent_count(tiny):
    model = tiny()
    batches = _batches(pad=5)
    counts = _router_counts(model, batches)
    shares = sieve_counts(model, batches)
    torch.testing.assert_close(shares, counts / counts.sum(-1, keepdim=True), rtol=0, atol=1e-6)
    expected = torch.zeros(L, E, dtype=torch.bool)
    for l in range(L):   # a plain sort of the counts, ties to the lower index
        expected[l, sorted(range(E), key=lambda e: (-counts[l, e].item(), e))[:E // 4]] = True
    assert torch.equal(select_sieve_experts(shares), expected)
    assert torch.equal(select_sieve_experts(counts), expected)


def test_sieve_does_not_count_padding(tiny):
    model = tiny()
    padded = _batches(pad=7)
    cut = [{"input_ids": b["input_ids"][1:, :5], "attention_mask": b["attention_mask"][1:, :5]} for b in padded]
    first = [{"input_ids": b["input_ids"][:1], "attention_mask": b["attention_mask"][:1]} for b in padded]
    alone = _router_counts(model, cut) + _router_counts(model, first)
    torch.testing.assert_close(sieve_counts(model, padded), alone / alone.sum(-1, keepdim=True), rtol=0, atol=1e-6)


def test_sieve_size_and_bad_input():
    assert [sieve_size(e) for e in (2, 4, 8, 10, 64)] == [1, 1, 2, 2, 16]
    t = torch.tensor([[3.0, 3.0, 1.0, 0.0]])
    assert select_sieve_experts(t).int().tolist() == [[1, 0, 0, 0]]        # one of four, the lower of a tie
    for bad in (0, 1.2, True, float("nan")):
        with pytest.raises(EPnGError, match="share must be in"): select_sieve_experts(t, bad)
    with pytest.raises(EPnGError, match=">= 0"): select_sieve_experts(-t)


def test_sieve_handle_budget_share_and_static_training(tiny):
    base = tiny()
    model = copy.deepcopy(base)
    selected = select_sieve_experts(sieve_counts(model, _batches()))
    cfg = EPnGConfig(rank=4, lora_alpha=8)
    h = attach_sieve(model, selected, cfg)
    assert torch.equal(h.ranks, selected.long() * 4)
    assert h.budget == int(h.ranks.sum()) == L * (E // 4) * 4
    assert h.num_trainable() * 4 == attach(copy.deepcopy(base), cfg).num_trainable()
    ids = _batches(1)[0]["input_ids"]
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=1e-6)
    opt = torch.optim.AdamW(h.parameters(), lr=1e-2)
    ctl = make_controller(h, "sieve", max_steps=6)
    assert isinstance(ctl, EPnGController) and ctl.method == "static"
    model.train()
    for step in range(1, 7):
        model(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
        ctl.step_end(step, opt)
    assert ctl.history == [] and torch.equal(h.ranks, selected.long() * 4)
    check_ranks(h, h.ranks, slot_owners(h), "static")                      # a static run keeps its own budget
    for lora, keep in zip(h.loras, selected):
        free = lora.slot_owner < 0
        assert not any(lora.B[t].detach()[free].any() or lora.A[t].detach()[free].any() for t in lora.shapes)
        assert set(lora.slot_owner[~free].tolist()) == set(keep.nonzero().flatten().tolist())
    with pytest.raises(EPnGError, match="at least one"): attach_sieve(tiny(), torch.zeros(L, E, dtype=torch.bool), cfg)
    with pytest.raises(EPnGError, match="MoE layers × experts"): attach_sieve(tiny(), selected[:1], cfg)


def test_dr_lora_rules_are_pure_functions():
    assert grow_step(8, 32) == 3 and grow_step(8, 38) == 3 and grow_step(4, 16) == 2 and grow_step(4, 5) == 1
    assert [growth_quota(8, 2, 4, 3, j) for j in range(3)] == [5, 10, 16]
    sal = torch.tensor([[0.3, 0.1, 0.6], [0.0, 0.0, 0.0]])
    ranks = torch.tensor([[2, 2, 7], [2, 2, 2]])
    assert deal_growth(sal, ranks, [4, 3], r_max=8, step=2).tolist() == [[2, 1, 1], [2, 1, 0]]
    assert dr_lora_schedule(10_000) == dict(warmup_steps=300, cycle_interval=200)
    cfg = dr_lora_config()
    assert (cfg.rank, cfg.max_rank, cfg.targets, cfg.importance) == (8, 32, ("up_proj", "down_proj"), "selection")
    assert math.isclose(cfg.scaling, 16 / 32)                           # DR-LoRA's α / r_max with α = 16


def _dr_setup(tiny, steps=20):
    cfg = dr_lora_config(EPnGConfig(rank=2, lora_alpha=8, targets=("up_proj", "down_proj"), warmup_steps=2,
                                    cycle_interval=4), r_max=8, r_target=4)
    model = tiny()
    h = attach(model, cfg)
    opt = torch.optim.AdamW(h.parameters(), lr=1e-2)
    ctl = DRLoRAController(h, "dr_lora", max_steps=steps, seed=3, r_target=4)
    ctl.bind_optimizer(opt)
    return model, h, opt, ctl


def _steps(model, ctl, opt, first, last, seed=0, check=None):
    batches = _batches(last, seed)
    for step in range(first, last + 1):
        model.train()
        b = batches[step - 1]
        model(**b, labels=b["input_ids"]).loss.backward(); opt.step(); opt.zero_grad()
        before = None
        if ctl.is_cycle_step(step):
            model.eval()
            with torch.no_grad(): before = model(**batches[0]).logits
        record = ctl.step_end(step, opt)
        if check and record: check(record, before)


def test_dr_lora_quota_growth_no_pruning_exact_output_and_reset(tiny):
    model, h, opt, ctl = _dr_setup(tiny)
    assert ctl.events == [4, 8, 12, 16] and ctl.step_size == 1 and h.budget == L * E * 2
    seen = []
    def check(record, before):
        j = len(seen)
        assert not record.pruned.any() and int(record.added.min()) >= 0 and int(record.added.max()) <= ctl.step_size
        assert record.ranks.sum(1).tolist() == [E * 2 + growth_quota(E, 2, 4, 4, j)] * L       # exactly the quota
        assert torch.equal(record.ranks, (seen[-1] if seen else torch.full((L, E), 2)) + record.added)
        for sal, grown, r in zip(record.importance, record.added > 0, record.ranks):   # per layer: the most salient grew
            if grown.any() and (~grown & (r < 8)).any(): assert sal[grown].min() >= sal[~grown & (r < 8)].max()
        with torch.no_grad(): after = model(**_batches(1)[0]).logits
        assert (after - before).abs().max() <= 1e-6                     # growth leaves the output as it was
        assert ctl.routing.abs().sum() == 0 and ctl.slot_scores.abs().sum() == 0   # scores reset
        seen.append(record.ranks)
    _steps(model, ctl, opt, 1, 20, check=check)
    assert len(seen) == 4 and h.ranks.sum(1).tolist() == [E * 4] * L    # average r_target at the end
    check_ranks(h, h.ranks, slot_owners(h), "grow_only")                # the sum only rose above the budget
    assert (ctl.history[0].importance > 0).any()


def test_dr_lora_statistics_follow_the_spec(tiny):
    model, h, opt, ctl = _dr_setup(tiny)
    b = _batches(1)[0]
    counts = _router_counts(model, [b])
    def step(n):
        "One step on `b`; returns |Σ A⊙∇A| + |Σ B⊙∇B| summed over targets, per slot, read before the step."
        model.train()
        model(**b, labels=b["input_ids"]).loss.backward()
        x = torch.stack([sum((p.detach() * p.grad).sum(1).abs() for p in lora.parameters()) for lora in h.loras])
        opt.step(); opt.zero_grad()
        ctl.step_end(n, opt)
        return x
    x1 = step(1)
    torch.testing.assert_close(ctl.routing, counts, rtol=0, atol=1e-4)              # U = c after one step
    torch.testing.assert_close(ctl.slot_scores, 0.1 * x1, rtol=1e-5, atol=1e-12)
    x2 = step(2)
    assert x2.sum() > 0                                                             # B moved: gradients read
    torch.testing.assert_close(ctl.routing, 1.9 * counts, rtol=1e-6, atol=1e-4)     # U ← 0.9 U + c, the same batch
    torch.testing.assert_close(ctl.slot_scores, 0.09 * x1 + 0.1 * x2, rtol=1e-5, atol=1e-12)   # EMA 0.9
    s = ctl.saliency()
    assert s.shape == (L, E) and torch.isfinite(s).all() and (s >= 0).all() and s.sum() > 0
    f, ranks = ctl.routing / ctl.routing.sum(-1, keepdim=True), h.ranks
    g = torch.tensor([[float(ctl.slot_scores[l][lo.slot_owner == e].sum()) for e in range(E)] for l, lo in enumerate(h.loras)])
    g = g / (ranks * 2)                                                             # mean over slots and 2 targets
    torch.testing.assert_close(s, f * (g / g.sum(-1, keepdim=True)) / (ranks + 1) ** 1.2, rtol=1e-5, atol=1e-12)


def test_dr_lora_state_round_trip_resumes_exactly(tiny):
    model, h, opt, ctl = _dr_setup(tiny)
    _steps(model, ctl, opt, 1, 20)
    model1, h1, opt1, ctl1 = _dr_setup(tiny)
    _steps(model1, ctl1, opt1, 1, 10)
    state = {"loras": [copy.deepcopy(l.state_dict()) for l in h1.loras], "opt": copy.deepcopy(opt1.state_dict()),
             "ctl": copy.deepcopy(ctl1.state_dict())}
    model2, h2, opt2, ctl2 = _dr_setup(tiny)
    for lora, s in zip(h2.loras, state["loras"]): lora.load_state_dict(s)
    opt2.load_state_dict(state["opt"])
    ctl2.load_state_dict(state["ctl"])
    _steps(model2, ctl2, opt2, 11, 20)
    assert torch.equal(h2.ranks, h.ranks)
    for a, b in zip(h2.parameters(), h.parameters()): assert torch.equal(a, b)
    assert [r.step for r in ctl2.history] == [r.step for r in ctl.history] == [4, 8, 12, 16]
    for r2, r in zip(ctl2.history, ctl.history): assert torch.equal(r2.importance, r.importance)
    wrong = {**state["ctl"], "seed": 4}
    with pytest.raises(EPnGError, match="same settings"): _dr_setup(tiny)[3].load_state_dict(wrong)
    with pytest.raises(EPnGError, match="slot_scores is not"):
        _dr_setup(tiny)[3].load_state_dict({**state["ctl"], "slot_scores": state["ctl"]["slot_scores"][:1]})


def test_dr_lora_refuses_what_it_cannot_run(tiny):
    h = attach(tiny(), EPnGConfig(rank=2))
    with pytest.raises(EPnGError, match="importance='selection'"): DRLoRAController(h, "dr_lora", 10)
    h = attach(tiny(), dr_lora_config(EPnGConfig(rank=2), r_target=4))
    with pytest.raises(EPnGError, match="give max_steps"): DRLoRAController(h, "dr_lora")
    with pytest.raises(EPnGError, match="rank slots"): DRLoRAController(h, "dr_lora", 10, r_target=6)
    with pytest.raises(EPnGError, match="'dr_lora'"): DRLoRAController(h, "epng", 10)
    with pytest.warns(UserWarning, match="no growth event"): DRLoRAController(h, "dr_lora", 5)


def test_dr_lora_under_the_trainer(tiny, tmp_path):
    "The gradient hook reaches the torch optimizer inside accelerate's wrapper; events run on the Trainer's steps."
    cfg = dr_lora_config(EPnGConfig(rank=2, targets=("up_proj", "down_proj"), warmup_steps=2, cycle_interval=3),
                         r_max=8, r_target=4)
    model = tiny()
    h = attach(model, cfg)
    read = []

    class Driver(TrainerCallback):   # what EPnGCallback does, with the class make_controller picks
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            self.ctl = make_controller(h, "dr_lora", state.max_steps, seed=0, r_target=4)
            self.ctl.bind_optimizer(optimizer)
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            read.append(float(self.ctl.slot_scores.abs().sum()))
            self.ctl.step_end(state.global_step, optimizer)

    rows = [{"input_ids": b["input_ids"][0], "labels": b["input_ids"][0]} for b in _batches(16)]
    args = TrainingArguments(str(tmp_path), max_steps=8, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    driver = Driver()
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[driver]).train()
    assert all(r > 0 for r in read[1:])                                  # gradients read before every step
    assert [r.step for r in driver.ctl.history] == [3, 6]
    assert h.ranks.sum(1).tolist() == [E * 2 + growth_quota(E, 2, 4, 2, 1)] * L


def test_make_method_tuner(tiny):
    cfg = EPnGConfig(rank=2, warmup_steps=2, cycle_interval=3)
    h, ctl = make_method_tuner(tiny(), "sieve", cfg, 10, scoring_batches=_batches())
    assert ctl.method == "static" and int(h.ranks.sum()) == h.budget == L * 2 * 2
    h, ctl = make_method_tuner(tiny(), "dr_lora", cfg, 10)
    assert isinstance(ctl, DRLoRAController) and (ctl.r_init, ctl.r_max, ctl.r_target) == (2, 8, 4)
    assert h.config.importance == "selection" and math.isclose(h.config.scaling, cfg.lora_alpha / 8)
    with pytest.raises(EPnGError, match="scoring_batches"): make_method_tuner(tiny(), "sieve", cfg, 10)
    with pytest.raises(EPnGError, match="make_tuner"): make_method_tuner(tiny(), "epng", cfg, 10)


def _trainer_run(tiny, tmp, method, resume=None, steps=10):
    cfg = EPnGConfig(rank=2, lora_alpha=8, targets=("up_proj", "down_proj"), warmup_steps=2, cycle_interval=3)
    model = tiny()
    h = make_method_tuner(model, method, cfg, steps, scoring_batches=_batches())[0]
    callback = MethodCallback(h, method)
    rows = [{"input_ids": b["input_ids"][0], "labels": b["input_ids"][0]} for b in _batches(16)]
    args = TrainingArguments(str(tmp), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2, save_steps=5,
                             report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
    trainer.train(resume_from_checkpoint=callback.restore(resume) if resume else None)
    return h, callback


@pytest.mark.parametrize("method", ["dr_lora", "sieve"])
def test_method_callback_saves_and_resumes_under_the_trainer(tiny, tmp_path, method):
    h, cb = _trainer_run(tiny, tmp_path / "full", method)
    events = [3, 6, 9] if method == "dr_lora" else []
    assert [r.step for r in cb.controller.history] == events
    h2, cb2 = _trainer_run(tiny, tmp_path / "resumed", method, resume=tmp_path / "full" / "checkpoint-5")
    assert torch.equal(h2.ranks, h.ranks) and [r.step for r in cb2.controller.history] == events
    for a, b in zip(h2.parameters(), h.parameters()): torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    if method == "dr_lora":
        assert h.ranks.sum(1).tolist() == [E * 4] * L and type(cb.controller) is DRLoRAController
        torch.testing.assert_close(cb2.controller.history[-1].importance, cb.controller.history[-1].importance)
    else: assert int(h.ranks.sum()) == h.budget == L * 2 * 2


@pytest.mark.parametrize("method", ["sieve", "dr_lora"])
def test_epng_train_runs_the_method_and_resumes_exactly(method, tmp_path):
    "`epng train --method sieve|dr_lora` on the embedded model: the method's rank map, and a resume from step 4 is the run."
    from safetensors.torch import load_file
    from epng.train import TrainArgs, train
    settings = dict(method=method, max_steps=8, warmup_steps=2, cycle_interval=2, limit=32, rank=4, batch_size=4)
    full = train(TrainArgs(**settings, save_steps=4, output_dir=str(tmp_path / "full")), progress=False)
    resumed = train(TrainArgs(**settings, output_dir=str(tmp_path / "resumed"),
                              resume=str(tmp_path / "full" / "checkpoint-4")), progress=False)
    assert resumed["losses"] == full["losses"]
    ours, theirs = (load_file(tmp_path / k / "adapter" / "epng_adapter.safetensors") for k in ("resumed", "full"))
    for name in theirs: assert torch.equal(ours[name], theirs[name]), name
    ranks, handle = full["tuner"].ranks, full["tuner"]
    experts = ranks.shape[1]
    if method == "sieve":                           # r0 on the top quarter of each layer, never moved
        assert ((ranks > 0).sum(1) == experts // 4).all() and set(ranks.unique().tolist()) == {0, 4}
        assert int(ranks.sum()) == handle.budget and full["share"] < 0.3 * train(
            TrainArgs(**{**settings, "method": "static"}, output_dir=str(tmp_path / "static")), progress=False)["share"]
    else:                                           # grown to an average of r_target = 2 r0, never pruned
        assert len(full["controller"].history) == 3 and (ranks >= 4).all()
        assert int(ranks.sum()) == 8 * ranks.numel() and int(ranks.max()) <= 16
