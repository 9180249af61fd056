"DMEP (notebook 11c): LoRA-MoE on the nano dense model, exact removal of unused experts, optimizer slicing, save/load, schedule."
import json, shutil
import pytest
import torch
from torch import nn
from epng.moe import EPnGError
from epng.baselines import base_parameter_count
from epng.checkpoint import InvalidAdapterError
from epng.data import SFTDataset, make_batches
from epng.samples import nano_task
from epng.dmep import (DMEP_AUX_COEF, DMEP_CONFIG, DMEP_TARGETS, DMEP_WEIGHTS, DMEPController, DMEPLinear, attach_dmep,
                       experts_to_keep, load_dmep, load_nano_dense, nano_dense_config, nano_dense_path, read_dmep, save_dmep)

IDS = torch.tensor([[1] + [5 + 7 * i % 250 for i in range(15)]])


@pytest.fixture
def dense():
    torch.manual_seed(0)
    return load_nano_dense()[0]


def _randomise(handle, std=0.05):
    "Non-zero B (and random A, router) so every selected expert moves the output."
    with torch.no_grad():
        for p in handle.parameters(): p.normal_(0, std)


def _logits(model, ids=IDS, impl="fast"):
    DMEPLinear.impl = impl
    try:
        with torch.no_grad(): return model(input_ids=ids).logits
    finally: DMEPLinear.impl = "fast"


def test_nano_dense_is_shipped_small_and_loads():
    folder = nano_dense_path()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert sum(f.stat().st_size for f in folder.iterdir()) < 5 * 2**20
    record = json.loads((folder / "pretraining.json").read_text())
    assert sum(record["losses"][-20:]) / 20 < 0.5 * record["losses"][0]
    model, tok = load_nano_dense()
    assert model.config.model_type == "qwen3" and model.config.vocab_size == len(tok) == 259
    assert model.config.to_dict()["hidden_size"] == nano_dense_config().hidden_size
    with pytest.raises(EPnGError, match="pretrain_nano_dense"): load_nano_dense("/nonexistent/folder")


def test_trainable_share_counts_only_the_base_model(dense):
    base = sum(p.numel() for p in dense.parameters())
    handle = attach_dmep(dense)
    assert len(handle.modules) == len(DMEP_TARGETS) * dense.config.num_hidden_layers
    assert base_parameter_count(dense) == base
    per_module = [8 * (8 * (m.base.in_features + m.base.out_features) + m.base.in_features) for m in handle.modules.values()]
    assert handle.num_trainable() == sum(per_module)
    assert {id(p) for p in dense.parameters() if p.requires_grad} == {id(p) for p in handle.parameters()}
    assert 0 < handle.num_trainable() / base_parameter_count(dense) < 1


def test_fresh_adapter_is_the_base_model_and_loop_equals_dense(dense):
    want = _logits(dense)
    handle = attach_dmep(dense)
    dense.eval()
    assert torch.equal(_logits(dense), want)            # B = 0
    _randomise(handle)
    torch.testing.assert_close(_logits(dense, impl="loop"), _logits(dense), rtol=1e-5, atol=1e-5)


def test_balance_loss_matches_an_independent_computation():
    torch.manual_seed(0)
    layer = DMEPLinear(nn.Linear(10, 4), n_experts=6, rank=3, top_k=2)
    x = torch.randn(2, 7, 10)
    layer(x)
    logits = x.reshape(-1, 10) @ layer.epng_router.detach().T
    idx = logits.topk(2, -1).indices
    f = torch.bincount(idx.flatten(), minlength=6).float() / idx.numel()
    want = 6 * (f * logits.softmax(-1).mean(0)).sum()
    torch.testing.assert_close(layer.aux.detach(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.epng_counts, torch.bincount(idx.flatten(), minlength=6).double())


def test_padding_is_not_counted(dense):
    handle = attach_dmep(dense)
    _randomise(handle)
    dense.train()
    with torch.no_grad(): dense(input_ids=IDS[:, :10])
    plain = handle.counts()
    handle.reset_counts(); handle.balance_loss()
    padded = torch.cat([IDS[:, :10], torch.zeros(1, 6, dtype=torch.long)], 1)
    with torch.no_grad(): dense(input_ids=padded, attention_mask=(padded != 0).long())
    assert torch.equal(handle.counts(), plain)
    assert handle.context.mask is None                  # the mask is forgotten after the call


def test_removing_never_picked_experts_changes_nothing_and_slices_adamw(dense):
    handle = attach_dmep(dense)
    _randomise(handle)
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-3)
    dense.train()
    dense(input_ids=IDS).logits.sum().backward(); opt.step(); opt.zero_grad()
    handle.reset_counts()
    with torch.no_grad(): dense(input_ids=IDS)
    handle.balance_loss()
    dense.eval()
    before = {impl: _logits(dense, impl=impl) for impl in ("loop", "fast")}
    zero = handle.counts() == 0
    assert zero.any()
    old = {n: {k: getattr(m, f"epng_{k}").detach().clone() for k in ("A", "B", "router")} for n, m in handle.modules.items()}
    moments = {n: {k: {s: opt.state[getattr(m, f"epng_{k}")][s].clone() for s in ("exp_avg", "exp_avg_sq", "step")}
                   for k in ("A", "B", "router")} for n, m in handle.modules.items()}
    handle.remove_experts(threshold=1e-9, keep=2, optimizer=opt)
    assert torch.equal(~handle.kept(), zero)
    assert torch.equal(_logits(dense, impl="loop"), before["loop"])          # exactly
    drift = (_logits(dense) - before["fast"]).abs().max() / before["fast"].abs().max()
    assert drift <= 1e-6                                                     # float32 rounding of reordered sums
    for n, m in handle.modules.items():
        keep = m.epng_expert_ids
        assert m.n_experts >= 2
        for k in ("A", "B", "router"):
            p = getattr(m, f"epng_{k}")
            assert torch.equal(p.detach(), old[n][k][keep])
            assert torch.equal(opt.state[p]["exp_avg"], moments[n][k]["exp_avg"][keep])
            assert torch.equal(opt.state[p]["exp_avg_sq"], moments[n][k]["exp_avg_sq"][keep])
            assert torch.equal(opt.state[p]["step"], moments[n][k]["step"])
    assert len(opt.state) == 3 * len(handle.modules)
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in handle.parameters()]
    dense.train()                                                            # the optimizer trains the new tensors
    dense(input_ids=IDS).logits.sum().backward()
    a = next(iter(handle.modules.values())).epng_A
    a0 = a.detach().clone(); opt.step()
    assert not torch.equal(a.detach(), a0)


def test_threshold_rules(dense):
    share = torch.tensor([0.5, 0.3, 0.05, 0.05, 0.04, 0.03, 0.02, 0.01])
    assert experts_to_keep(share, 0.10, 2).tolist() == [0, 1]
    assert experts_to_keep(share, 0.40, 2).tolist() == [0, 1]
    assert experts_to_keep(torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1]), 0.5, 3).tolist() == [0, 1, 2]
    handle = attach_dmep(dense)
    with pytest.raises(EPnGError, match="no assignment was counted"): handle.remove_experts()
    dense.train()
    with torch.no_grad(): dense(input_ids=IDS)
    with pytest.raises(EPnGError, match="keep must be"): handle.remove_experts(keep=1)
    with pytest.raises(EPnGError, match="threshold must be"): handle.remove_experts(threshold=1.0)
    handle.remove_experts(threshold=0.99, keep=2)
    assert all(m.n_experts == 2 for m in handle.modules.values())
    with pytest.raises(EPnGError, match="cannot be merged"): handle.merged_model()
    with pytest.raises(EPnGError, match="already has DMEP"): attach_dmep(dense)
    with pytest.raises(EPnGError, match="top_k"): attach_dmep(load_nano_dense()[0], n_experts=2, top_k=3)


def _trained_handle(dense):
    handle = attach_dmep(dense)
    _randomise(handle)
    dense.train()
    with torch.no_grad(): dense(input_ids=IDS)
    handle.remove_experts(threshold=0.12, keep=2)
    return handle


def test_save_load_round_trip_is_exact(dense, tmp_path):
    handle = _trained_handle(dense)
    dense.eval()
    want = _logits(dense)
    save_dmep(handle, tmp_path / "a")
    fresh = load_nano_dense()[0].eval()
    loaded = load_dmep(fresh, tmp_path / "a")
    assert torch.equal(_logits(fresh), want)
    assert torch.equal(loaded.kept(), handle.kept())
    for name, m in loaded.modules.items():
        for k in ("A", "B", "router"):
            assert torch.equal(getattr(m, f"epng_{k}"), getattr(handle.modules[name], f"epng_{k}"))
    assert not any(f.suffix in (".pt", ".pkl", ".bin") for f in (tmp_path / "a").iterdir())


def _edit_json(change):
    def edit(folder):
        meta = json.loads((folder / DMEP_CONFIG).read_text())
        change(meta)
        (folder / DMEP_CONFIG).write_text(json.dumps(meta))
    return edit


def _nan_tensor(folder):
    from safetensors.torch import load_file, save_file
    tensors = load_file(folder / DMEP_WEIGHTS)
    name = next(k for k in tensors if k.endswith(".B"))
    tensors[name][0, 0, 0] = float("nan")
    save_file(tensors, folder / DMEP_WEIGHTS)


@pytest.mark.parametrize("edit, message", [
    (lambda f: (f / DMEP_WEIGHTS).write_bytes((f / DMEP_WEIGHTS).read_bytes()[:500]), "not a readable safetensors"),
    (lambda f: (f / DMEP_WEIGHTS).write_bytes(b""), "not a readable safetensors"),
    (lambda f: (f / DMEP_CONFIG).write_text("{"), "not valid JSON"),
    (lambda f: (f / DMEP_CONFIG).write_text("[]"), "not an object"),
    (lambda f: (f / DMEP_CONFIG).unlink(), "no DMEP adapter"),
    (_edit_json(lambda m: m.update(format="epng-adapter")), "not 'epng-dmep'"),
    (_edit_json(lambda m: m.update(format_version=7)), "format_version"),
    (_edit_json(lambda m: m.update(rank=16)), "expected F32"),
    (_edit_json(lambda m: m.update(dtype="int8")), "dtype"),
    (_edit_json(lambda m: m.update(n_experts=0)), "n_experts"),
    (_edit_json(lambda m: m.update(lora_alpha=float("inf"))), "lora_alpha"),
    (_edit_json(lambda m: next(iter(m["modules"].values())).update(experts=[0, 8])), "below n_experts"),
    (_edit_json(lambda m: next(iter(m["modules"].values())).update(experts=[1, 1])), "ascending"),
    (_edit_json(lambda m: next(iter(m["modules"].values())).update(experts=[0])), "top_k"),
    (_edit_json(lambda m: next(iter(m["modules"].values())).update({"in": 64})), "expected F32"),
    (_edit_json(lambda m: m["modules"].pop(next(iter(m["modules"])))), "not expected"),
    (_nan_tensor, "NaN"),
])
def test_damaged_adapters_are_refused(dense, tmp_path, edit, message):
    save_dmep(_trained_handle(dense), tmp_path / "a")
    edit(tmp_path / "a")
    with pytest.raises(EPnGError, match=message): load_dmep(load_nano_dense()[0], tmp_path / "a")


def test_expert_ids_that_disagree_with_the_json_are_refused(dense, tmp_path):
    save_dmep(_trained_handle(dense), tmp_path / "a")
    meta = json.loads((tmp_path / "a" / DMEP_CONFIG).read_text())
    name = next(n for n, m in meta["modules"].items() if m["experts"] != list(range(len(m["experts"]))))
    meta["modules"][name]["experts"] = list(range(len(meta["modules"][name]["experts"])))
    (tmp_path / "a" / DMEP_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(InvalidAdapterError, match="JSON gives other experts"): read_dmep(tmp_path / "a")


def test_adapter_for_another_model_is_refused(dense, tmp_path):
    from transformers import AutoModelForCausalLM
    save_dmep(_trained_handle(dense), tmp_path / "a")
    other = AutoModelForCausalLM.from_config(nano_dense_config(intermediate_size=256))
    with pytest.raises(EPnGError, match="load it into its base model"): load_dmep(other, tmp_path / "a")
    deeper = AutoModelForCausalLM.from_config(nano_dense_config(num_hidden_layers=5))
    with pytest.raises(EPnGError, match="made for other modules"): load_dmep(deeper, tmp_path / "a")


def test_controller_trains_removes_once_and_resumes(dense):
    torch.manual_seed(0)
    handle = attach_dmep(dense)
    tok = load_nano_dense()[1]
    task = SFTDataset([(r["query"], r["response"]) for r in nano_task(64, seed=0)], tok, max_length=256)
    opt = torch.optim.AdamW(handle.parameters(), lr=2e-3, weight_decay=0.0)
    controller = DMEPController(handle, warmup_steps=8)
    assert controller.aux_loss_weight == DMEP_AUX_COEF and handle.balance_on
    losses, removals = [], []
    dense.train()
    for step, batch in enumerate(make_batches(task, 8, seed=0, num_steps=16), start=1):
        out = dense(**batch)
        if step <= 8: assert handle.modules[next(iter(handle.modules))].aux is not None
        else: assert all(m.aux is None for m in handle.modules.values())
        controller.loss(out.loss).backward()
        opt.step(); opt.zero_grad()
        losses.append(out.loss.item())
        if (r := controller.step_end(step, opt)) is not None: removals.append(r)
    assert [r["step"] for r in removals] == [8] and controller.removed
    assert controller.aux_loss_weight == 0 and not handle.balance_on
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert all(m.n_experts >= 2 for m in handle.modules.values())
    assert removals[0]["trainable_after"] == handle.num_trainable() < removals[0]["trainable_before"]
    state = json.loads(json.dumps(controller.state_dict()))
    again = DMEPController(handle, warmup_steps=8)
    again.load_state_dict(state)
    assert again.removed and not handle.balance_on and again.step_end(20) is None
    with pytest.raises(EPnGError, match="same settings"): DMEPController(handle, warmup_steps=9).load_state_dict(state)
    with pytest.raises(EPnGError, match="do not match"):
        DMEPController(attach_dmep(load_nano_dense()[0]), warmup_steps=8).load_state_dict(state)
    bad = json.loads(json.dumps(state)); bad["counts"][0][0] = -1.0
    with pytest.raises(EPnGError, match="counts"): DMEPController(handle, warmup_steps=8).load_state_dict(bad)


def test_state_dict_resumes_after_removal_with_the_optimizer(dense):
    handle = _trained_handle(dense)
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-3)
    dense.train()
    dense(input_ids=IDS).logits.sum().backward(); opt.step(); opt.zero_grad()
    resumed = attach_dmep(load_nano_dense()[0])
    fresh_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    resumed.bind_optimizer(fresh_opt)
    resumed.load_state_dict(handle.state_dict())
    assert torch.equal(resumed.kept(), handle.kept())
    fresh_opt.load_state_dict(opt.state_dict())
    for p, q in zip(resumed.parameters(), handle.parameters()):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(fresh_opt.state[p]["exp_avg_sq"], opt.state[q]["exp_avg_sq"])
    with pytest.raises(EPnGError, match="does not fit"): resumed.load_state_dict({})
    full = attach_dmep(load_nano_dense()[0])
    with pytest.raises(EPnGError, match="saved experts"):      # a removed expert cannot come back
        handle.load_state_dict(full.state_dict())


def test_epng_train_runs_dmep_and_resumes_exactly(tmp_path, monkeypatch):
    "`epng train --method dmep` on the nano dense model: removal after T_w steps, and resumes before or after it are the run."
    import sys
    from safetensors.torch import load_file
    from epng.train import TrainArgs, train
    settings = dict(method="dmep", max_steps=9, warmup_steps=4, limit=48, batch_size=4)
    full = train(TrainArgs(**settings, save_steps=3, output_dir=str(tmp_path / "full")), progress=False)
    removal = json.loads((tmp_path / "full" / "metrics.json").read_text())["removal"]
    assert removal["step"] == 4 and removal["trainable_after"] < removal["trainable_before"]
    assert full["share"] == full["tuner"].num_trainable() / base_parameter_count(full["model"])
    weights = lambda run: load_file(tmp_path / run / "adapter" / "dmep_adapter.safetensors")
    for stop in (3, 6):                                  # before and after the removal
        resumed = train(TrainArgs(**settings, output_dir=str(tmp_path / f"from{stop}"),
                                  resume=str(tmp_path / "full" / f"checkpoint-{stop}")), progress=False)
        assert resumed["losses"] == full["losses"], stop
        ours, theirs = weights(f"from{stop}"), weights("full")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), stop
    model, _ = load_nano_dense()
    reloaded = load_dmep(model, tmp_path / "full" / "adapter")
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    full["model"].eval(); reloaded.model.eval()
    with torch.no_grad(): assert torch.equal(reloaded.model(input_ids=ids).logits, full["model"](input_ids=ids).logits)
    monkeypatch.setattr(sys.modules["epng.train"], "init_processes", lambda timeout: (0, 2, torch.device("cpu")))
    with pytest.raises(EPnGError, match="dmep runs in one process"):
        train(TrainArgs(**settings, output_dir=str(tmp_path / "two")), progress=False)


# ---- DMEP in the transformers Trainer (DMEPCallback) ----

def _trainer_args(out, **kw):
    from transformers import TrainingArguments
    settings = dict(max_steps=6, per_device_train_batch_size=4, learning_rate=3e-3, optim="adamw_torch",
                    save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_steps=1)
    return TrainingArguments(str(out), **{**settings, **kw})


def _task(tok, n=32):
    return SFTDataset([(r["query"], r["response"]) for r in nano_task(n, seed=0)], tok, max_length=256)


def _twins(seed=0):
    "Two identical nano dense models with identical random DMEP adapters: one for the Trainer, one to compute by hand."
    out = []
    for _ in range(2):
        torch.manual_seed(seed)
        model, tok = load_nano_dense()
        handle = attach_dmep(model)
        torch.manual_seed(seed + 1)
        _randomise(handle)
        out.append((model, handle))
    return out, tok


def test_trainer_loss_has_the_balancing_term_until_the_removal(tmp_path):
    from transformers import Trainer
    from epng.data import collate
    from epng.dmep import DMEPCallback
    ((model, handle), (twin, twin_handle)), tok = _twins()
    callback = DMEPCallback(handle, warmup_steps=2)
    trainer = Trainer(model=model, args=_trainer_args(tmp_path, gradient_accumulation_steps=2), callbacks=[callback])
    callback.on_train_begin(trainer.args, trainer.state, trainer.control)
    batch = collate([_task(tok)[i] for i in range(6)], 1)
    n = trainer._get_num_items_in_batch([batch], "cpu")
    model.train(); twin.train()
    with torch.no_grad():
        # normalised by num_items_in_batch: the Trainer does not divide by the 2 accumulation steps, the hook does
        got = trainer.compute_loss(model, dict(batch), num_items_in_batch=n)
        want = twin(**batch, num_items_in_batch=n).loss + DMEP_AUX_COEF * twin_handle.balance_loss() / 2
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        got = trainer.compute_loss(model, dict(batch))                       # a mean: the Trainer divides it
        want = twin(**batch).loss + DMEP_AUX_COEF * twin_handle.balance_loss()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert got > twin(**batch).loss
        model(input_ids=batch["input_ids"])                                  # no labels: no loss, nothing left over
        assert all(m.aux is None for m in handle.modules.values())
        counts = handle.counts()
        model.eval(); twin.eval()                                            # evaluation: no term, nothing counted
        torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), twin(**batch).loss, rtol=1e-6, atol=0)
        assert torch.equal(handle.counts(), counts) and all(m.aux is None for m in handle.modules.values())
        assert callback.controller.step_end(2) is not None and not handle.balance_on
        model.train()                                                        # after the removal: the plain loss
        plain = trainer.compute_loss(model, dict(batch))
        model.eval()
        assert torch.equal(plain, model(**batch).loss)
    hooks = len(model._forward_hooks)
    callback.remove()                                                        # the hooks come off
    assert len(model._forward_hooks) == hooks - 1
    assert not any(m._load_state_dict_pre_hooks for m in handle.modules.values())


def test_trainer_step_gradient_is_epng_trains(tmp_path):
    "One step of 2 accumulated micro-batches: the Trainer's gradient is epng train's (`step_loss`), balancing term included."
    from transformers import Trainer
    from epng.dmep import DMEPCallback
    from epng.train import TrainArgs, step_loss
    ((model, handle), (twin, twin_handle)), tok = _twins()
    micro = list(make_batches(_task(tok, 16), 4, seed=0, num_steps=2))
    controller = DMEPController(twin_handle, 3)
    run = dict(args=TrainArgs(method="dmep", grad_accum=2), world=1, device=torch.device("cpu"),
               aux_loss=lambda: controller.aux_loss_weight * twin_handle.balance_loss())
    twin.train()
    step_loss(twin, iter(micro), run)
    callback = DMEPCallback(handle, warmup_steps=3)
    trainer = Trainer(model=model, args=_trainer_args(tmp_path, gradient_accumulation_steps=2), callbacks=[callback])
    callback.on_train_begin(trainer.args, trainer.state, trainer.control)
    trainer.current_gradient_accumulation_steps = 2
    n = trainer._get_num_items_in_batch(micro, "cpu")
    for batch in micro: trainer.training_step(model, dict(batch), n)
    for p, q in zip(handle.parameters(), twin_handle.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-6 * float(q.grad.abs().max()))
    assert torch.equal(handle.counts(), twin_handle.counts())


def test_trainer_and_epng_train_remove_the_same_experts(tmp_path):
    """The same seed, settings and batch order (2 accumulated micro-batches a step) in the Trainer and in `epng train`:
    the same experts go. The adapters then agree to ~1e-4, not bit for bit: the two sum the token losses in another
    order (epng train: each micro-batch's mean × its token share; the Trainer: the micro-batch's sum ÷ the step's
    tokens), and AdamW's division by √v enlarges last-bit differences in coordinates with tiny gradients."""
    import random
    from transformers import Trainer
    from epng.dmep import DMEPCallback
    from epng.train import TrainArgs, embedded_rows, load_model_and_tokenizer, model_source, step_batches, train
    settings = dict(method="dmep", max_steps=6, warmup_steps=3, limit=32, batch_size=4, grad_accum=2)
    full = train(TrainArgs(**settings, output_dir=str(tmp_path / "epng")), progress=False)
    args = full["args"]
    torch.manual_seed(args.seed); random.seed(args.seed)                 # what train() does before attach_dmep
    model, tok = load_model_and_tokenizer(model_source(args), args.bf16, torch.device("cpu"))
    dataset = SFTDataset(embedded_rows(limit=args.limit, seed=args.seed), tok, max_length=args.max_length)
    handle = attach_dmep(model, rank=args.rank, lora_alpha=args.lora_alpha)
    batches = [b for b, _ in zip(step_batches(dataset, args, 0, 1, 0), range(args.max_steps * args.grad_accum))]
    class InOrder(torch.utils.data.IterableDataset):                     # epng train's micro-batches, in its order
        def __iter__(self): return iter(batches)
    callback = DMEPCallback(handle, args.warmup_steps)
    targs = _trainer_args(tmp_path / "hf", max_steps=args.max_steps, per_device_train_batch_size=1, learning_rate=args.lr,
                          gradient_accumulation_steps=args.grad_accum, weight_decay=args.weight_decay,
                          max_grad_norm=args.max_grad_norm, lr_scheduler_type="linear", seed=args.seed)
    trainer = Trainer(model=model, args=targs, train_dataset=InOrder(), data_collator=lambda rows: rows[0],
                      callbacks=[callback])
    trainer.train()
    assert callback.controller.history[0]["step"] == 3 and full["controller"].history[0]["step"] == 3
    assert torch.equal(handle.kept(), full["tuner"].kept()) and not handle.kept().all()
    for p, q in zip(handle.parameters(), full["tuner"].parameters()): torch.testing.assert_close(p, q, rtol=0, atol=1e-3)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for step, (ours, theirs) in enumerate(zip(logged, full["losses"]), start=1):
        if step <= 3: assert 0 < ours - theirs < 0.05              # the Trainer's loss holds c · L_bal in the warm-up
        else: assert abs(ours - theirs) <= 1e-4 * theirs          # after it, the plain loss of (nearly) the same adapter


def test_trainer_removal_slices_the_optimizer(tmp_path):
    from transformers import Trainer, TrainerCallback
    from epng.data import collate
    from epng.dmep import DMEPCallback
    torch.manual_seed(0)
    model, tok = load_nano_dense()
    handle = attach_dmep(model)
    task = _task(tok)
    seen = {}
    class Moments(TrainerCallback):
        "Each module's AdamW state at the end of step 3, before or after DMEPCallback runs."
        def __init__(self, when): self.when = when
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step != 3: return
            inner = optimizer.optimizer
            seen[self.when] = {n: {k: {s: v.clone() for s, v in inner.state[getattr(m, f"epng_{k}")].items()}
                                   for k in ("A", "B", "router")} for n, m in handle.modules.items()}
            seen[self.when + " ids"] = {n: m.epng_expert_ids.clone() for n, m in handle.modules.items()}
            seen[self.when + " values"] = {n: m.epng_A.detach().clone() for n, m in handle.modules.items()}
    callback = DMEPCallback(handle, warmup_steps=3)
    trainer = Trainer(model=model, args=_trainer_args(tmp_path, max_steps=5), train_dataset=task,
                      data_collator=lambda rows: collate(rows, task.pad_id),
                      callbacks=[Moments("before"), callback, Moments("after")])
    trainer.train()
    assert type(handle.optimizer).__name__ == "AcceleratedOptimizer"
    inner = handle.optimizer.optimizer
    assert {id(p) for g in inner.param_groups for p in g["params"]} == {id(p) for p in handle.parameters()}
    assert sum(len(g["params"]) for g in inner.param_groups) == len(list(handle.parameters())) == len(inner.state)
    removed = 0
    for n, m in handle.modules.items():
        keep = seen["after ids"][n]
        assert torch.equal(keep, m.epng_expert_ids) and seen["before ids"][n].tolist() == list(range(8))
        removed += 8 - len(keep)
        for k in ("A", "B", "router"):
            for s in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(seen["after"][n][k][s], seen["before"][n][k][s][keep]), (n, k, s)
            assert torch.equal(seen["after"][n][k]["step"], seen["before"][n][k]["step"])
        assert not torch.equal(m.epng_A.detach(), seen["after values"][n])   # the optimizer trains the new tensors
    assert removed > 0
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    torch.testing.assert_close(lrs, [3e-3 * (1 - s / 5) for s in range(5)])   # the schedule goes on after the removal
    assert all(g["lr"] == 0 for g in inner.param_groups)
    kept = next(h for h in trainer.state.log_history if "dmep_experts_kept" in h)
    assert kept == {"step": 3, "dmep_experts_kept": int(handle.kept().sum()),
                    "dmep_trainable_before": callback.controller.history[0]["trainable_before"],
                    "dmep_trainable_after": handle.num_trainable()}


def _resumable_run(out, resume=None, warmup_steps=3, **kw):
    from transformers import Trainer
    from epng.data import collate
    from epng.dmep import DMEPCallback
    torch.manual_seed(0)
    model, tok = load_nano_dense()
    handle = attach_dmep(model)
    task = _task(tok)
    callback = DMEPCallback(handle, warmup_steps=warmup_steps)
    trainer = Trainer(model=model, args=_trainer_args(out, save_strategy="steps", save_steps=2, **kw), train_dataset=task,
                      data_collator=lambda rows: collate(rows, task.pad_id), callbacks=[callback])
    return handle, callback, trainer


def test_trainer_resumes_exactly_before_and_after_the_removal(tmp_path):
    handle, callback, trainer = _resumable_run(tmp_path / "full")
    trainer.train()
    assert (tmp_path / "full" / "checkpoint-4" / "dmep_state" / "state.json").is_file()
    for stop in (2, 4):                                                      # the removal is at the end of step 3
        h2, cb2, tr2 = _resumable_run(tmp_path / f"from{stop}")
        assert cb2.restore(tmp_path / "full" / f"checkpoint-{stop}") == str(tmp_path / "full" / f"checkpoint-{stop}")
        assert h2.kept().all() == (stop == 2)
        tr2.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{stop}"))
        assert torch.equal(h2.kept(), handle.kept()) and cb2.controller.history == callback.controller.history
        for p, q in zip(h2.parameters(), handle.parameters()): torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        assert torch.equal(h2.counts(), handle.counts())
    h3, cb3, _ = _resumable_run(tmp_path / "newest")
    assert cb3.restore(tmp_path / "full") == str(tmp_path / "full" / "checkpoint-6")   # an output folder: its newest
    for stop, message in ((4, "callback.restore"), (2, "DMEPCallback.restore was not called")):
        _, _, forgot = _resumable_run(tmp_path / f"forgot{stop}")           # a fresh adapter without restore: refused
        with pytest.raises(EPnGError, match=message):
            forgot.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{stop}"))


def test_trainer_restore_refuses_before_changing_the_adapter(tmp_path):
    from epng.io import load_state, save_state
    handle, _, trainer = _resumable_run(tmp_path / "full", max_steps=4)
    trainer.train()
    h2, cb2, _ = _resumable_run(tmp_path / "other", warmup_steps=2)
    with pytest.raises(EPnGError, match="same settings"): cb2.restore(tmp_path / "full" / "checkpoint-4")
    assert h2.kept().all()
    folder = tmp_path / "full" / "checkpoint-4" / "dmep_state"
    state = load_state(folder, "state")
    state["controller"]["counts"][0][int((~handle.kept()[0]).nonzero()[0])] = 5.0   # a removed expert with counts
    save_state(state, folder, "state")
    h3, cb3, _ = _resumable_run(tmp_path / "damaged")
    with pytest.raises(EPnGError, match="removed experts"): cb3.restore(tmp_path / "full" / "checkpoint-4")
    assert h3.kept().all() and not cb3.controller.removed
    shutil.rmtree(folder)
    with pytest.raises(EPnGError, match="no dmep_state"): cb3.restore(tmp_path / "full" / "checkpoint-4")
    with pytest.warns(UserWarning, match="skipping checkpoint-4"): assert cb3.restore(tmp_path / "full").endswith("checkpoint-2")


def test_trainer_callback_refuses_what_it_cannot_run(tmp_path):
    from types import SimpleNamespace
    from transformers import Trainer
    from epng.dmep import DMEPCallback
    torch.manual_seed(0)
    model, _ = load_nano_dense()
    callback = DMEPCallback(attach_dmep(model), warmup_steps=2)
    with pytest.raises(EPnGError, match="label smoothing"):
        Trainer(model=model, args=_trainer_args(tmp_path, label_smoothing_factor=0.1), callbacks=[callback])
    with pytest.raises(EPnGError, match="gradient checkpointing"):
        Trainer(model=model, args=_trainer_args(tmp_path, gradient_checkpointing=True), callbacks=[callback])
    with pytest.raises(EPnGError, match="one process"):
        callback.on_init_end(SimpleNamespace(world_size=2, deepspeed=None, fsdp=""), None, None)
    with pytest.raises(EPnGError, match="warmup_steps"): DMEPCallback(callback.handle, warmup_steps=0)


def test_trainer_callback_refuses_trls_fused_head_loss(tmp_path):
    "TRL's SFTTrainer takes its loss from its fused LM head's log-probabilities, not outputs.loss: refused, not lost."
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from epng.dmep import DMEPCallback
    torch.manual_seed(0)
    model, tok = load_nano_dense()
    callback = DMEPCallback(attach_dmep(model), warmup_steps=2)
    rows = Dataset.from_list([{"prompt": r["query"], "completion": r["response"]} for r in nano_task(8, seed=0)])
    args = SFTConfig(str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                     disable_tqdm=True, gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok, callbacks=[callback])
    with pytest.raises(EPnGError, match="SFTTrainer"): trainer.train()


def test_dmep_refuses_gradient_checkpointing_before_loading():
    "A recomputed forward would count every assignment twice: the settings check says so before a model loads."
    from epng.settings import TrainArgs
    with pytest.raises(EPnGError, match="dmep runs without gradient_checkpointing"):
        TrainArgs(method="dmep", gradient_checkpointing=True).resolved()
