"ESFT and full fine-tuning baselines: selection, training only the selected experts, merging, checkpoints, errors."
import copy
import pytest
import torch
import epng
from epng.baselines import (ESFT_TOP_P, esft_scores, select_esft_experts, attach_esft, attach_fft, share_table,
                            base_parameter_count)


def _ids(seed=0, shape=(4, 12)):
    return torch.randint(3, 256, shape, generator=torch.Generator().manual_seed(seed))


def _train(model, params, ids, steps=3):
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step(); opt.zero_grad()
    return opt


def _changed_experts(merged, base):
    "(layers × experts) bool of expert slices that differ from `base`; asserts every other parameter is bit-identical."
    after, rows = dict(merged.named_parameters()), []
    for name, p in base.named_parameters():
        if name.endswith(("gate_up_proj", "down_proj")): rows.append((after[name] != p).flatten(1).any(1))
        else: assert torch.equal(after[name], p), name
    return torch.stack(rows).view(-1, 2, rows[0].numel()).any(1)


def test_selection_math():
    s = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.05, 0.05, 0.6, 0.3], [0.25, 0.25, 0.25, 0.25]])
    assert select_esft_experts(s, 0.2).int().tolist() == [[1, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]]
    assert select_esft_experts(s, 0.75).int().tolist() == [[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 0]]
    assert select_esft_experts(s, 0.9).sum(1).tolist() == [3, 2, 4]  # 0.6 + 0.3 reaches 0.9
    # ties go to the lower index, one expert at least
    assert select_esft_experts(torch.ones(1, 5), 1e-3).int().tolist() == [[1, 0, 0, 0, 0]]
    assert select_esft_experts(torch.tensor([[0.0, 3.0, 3.0]]), 1e-3).int().tolist() == [[0, 1, 0]]


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.01, float("nan"), "0.2"])
def test_bad_top_p(bad):
    with pytest.raises(epng.EPnGError, match=r"top_p must be in \(0, 1\]"):
        select_esft_experts(torch.ones(2, 4), bad)


def test_scores_ignore_padding_and_sum_to_one(tiny):
    model = tiny()
    ids = _ids()
    for criterion in ("gate", "token"):
        plain = esft_scores(model, [{"input_ids": ids[:1, :8]}], criterion)
        padded = {"input_ids": torch.cat([ids[:1, :8], torch.zeros(1, 4, dtype=torch.long)], 1),
                  "attention_mask": torch.tensor([[1] * 8 + [0] * 4])}
        torch.testing.assert_close(esft_scores(model, [padded], criterion), plain, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(plain.sum(1), torch.ones(2))
    # token criterion: each real token makes top_k choices; with one token the shares are 1/k on its experts
    one = esft_scores(model, [{"input_ids": ids[:1, :1]}], "token")
    assert sorted(set(one.flatten().tolist())) == [0.0, 0.5]
    with pytest.raises(epng.EPnGError, match="'gate'.*'token'"):
        esft_scores(model, [{"input_ids": ids}], "probability")


def test_gate_score_is_epng_importance(tiny):
    "ESFT's gate score on the data equals EPnG's p̄ from the same forwards."
    model = tiny()
    ids = _ids()
    scores = esft_scores(model, [{"input_ids": ids}], "gate")
    h = epng.attach(copy.deepcopy(model))
    h.model.train()
    h.model(input_ids=ids)
    torch.testing.assert_close(scores, h.importance.mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe"])
def test_esft_trains_only_selected_experts(tiny, arch):
    base = tiny(arch)
    model = copy.deepcopy(base)
    ids = _ids(1)
    selected = select_esft_experts(esft_scores(model, [{"input_ids": ids}]), ESFT_TOP_P["token"] * 2)
    assert 0 < selected.sum() < selected.numel()
    h = attach_esft(model, selected)
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=1e-6)

    full = {tuple(p.shape) for n, p in base.named_parameters() if "experts" in n}
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".epng_esft." not in n)
    assert not any(tuple(p.shape) in full for p in h.parameters())
    cfg = base.config
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    assert h.num_trainable() == int(selected.sum()) * 3 * cfg.hidden_size * inter

    _train(model, h.parameters(), ids)
    assert all(p.grad is None for n, p in model.named_parameters() if ".epng_esft." not in n)
    merged = h.merged_model()
    assert torch.equal(_changed_experts(merged, base), selected)   # shared expert and router untouched too
    torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert merged.config._experts_implementation == "grouped_mm"
    assert not any("epng" in n for n in merged.state_dict())


def test_checkpoint_round_trip(tiny):
    base = tiny()
    ids = _ids(2)
    selected = torch.zeros(2, 8, dtype=torch.bool); selected[0, [1, 4]] = True; selected[1, 7] = True
    h = attach_esft(copy.deepcopy(base), selected)
    _train(h.model, h.parameters(), ids, steps=2)
    state = h.state_dict()
    again = attach_esft(copy.deepcopy(base), state["selected"])
    again.load_state_dict(state)
    torch.testing.assert_close(again.model(input_ids=ids).logits, h.model(input_ids=ids).logits)
    wrong = selected.clone(); wrong[1, 0] = True
    with pytest.raises(epng.EPnGError, match="other experts"):
        attach_esft(copy.deepcopy(base), wrong).load_state_dict(state)


def test_layer_without_selected_expert_and_gradient_checkpointing(tiny):
    base = tiny()
    ids = _ids(3)
    selected = torch.zeros(2, 8, dtype=torch.bool); selected[1, 2:5] = True   # layer 0 trains nothing
    model = copy.deepcopy(base)
    h = attach_esft(model, selected)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _train(model, h.parameters(), ids, steps=2)
    assert torch.equal(_changed_experts(h.merged_model(), base), selected)


def test_fft_trains_everything(tiny):
    base = tiny("qwen2_moe")
    model = copy.deepcopy(base)
    model.requires_grad_(False)           # attach_fft turns everything back on
    fft = attach_fft(model)
    assert fft.num_trainable() == epng.moe.count_parameters(base)
    _train(model, fft.parameters(), _ids(4), steps=1)
    moved = [n for (n, p), q in zip(model.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert "model.layers.0.mlp.gate.weight" in moved and "model.layers.0.mlp.shared_expert.down_proj.weight" in moved
    assert "model.embed_tokens.weight" in moved and "lm_head.weight" in moved
    assert fft.merged_model() is model


def test_share_table(tiny):
    base = tiny()
    selected = torch.zeros(2, 8, dtype=torch.bool); selected[:, 0] = True
    esft = attach_esft(copy.deepcopy(base), selected)
    lora = epng.attach(copy.deepcopy(base))
    shares = share_table(esft.model, {"FFT": attach_fft(copy.deepcopy(base)), "ESFT": esft, "LoRA": lora, "n": 100})
    total = epng.moe.count_parameters(base)
    assert base_parameter_count(esft.model) == base_parameter_count(lora.model) == total
    assert shares["FFT"] == 100.0
    assert shares["ESFT"] == pytest.approx(100 * 2 * 3 * 64 * 32 / total)
    assert shares["LoRA"] == pytest.approx(100 * lora.num_trainable() / total)
    assert shares["n"] == pytest.approx(100 * 100 / total)


def test_bad_selection_and_double_attach(tiny):
    model = tiny()
    with pytest.raises(epng.EPnGError, match="shape"):
        attach_esft(model, torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(epng.EPnGError, match="no expert"):
        attach_esft(model, torch.zeros(2, 8))
    with pytest.raises(epng.EPnGError, match="0/1 or bool"):
        attach_esft(model, torch.full((2, 8), 0.5))
    attach_esft(model, torch.ones(2, 8))
    with pytest.raises(epng.EPnGError, match="already has epng adapters"):
        attach_esft(model, torch.ones(2, 8))
    with pytest.raises(epng.EPnGError, match="already has epng adapters"):
        attach_fft(model)
    with pytest.raises(epng.EPnGError, match="no real token"):
        esft_scores(tiny(), [{"input_ids": torch.ones(1, 3, dtype=torch.long)}] * 0)


def test_delta_gradient_is_the_weight_gradient(tiny):
    "∂L/∂D_e equals ∂L/∂W_e of the same experts when the fused weights themselves train."
    base = tiny()
    ids = _ids(5)
    ref = copy.deepcopy(base).requires_grad_(False)
    layers = epng.find_moe_layers(ref)
    for layer in layers:
        layer.experts.gate_up_proj.requires_grad_(True); layer.experts.down_proj.requires_grad_(True)
    ref(input_ids=ids, labels=ids).loss.backward()
    selected = torch.zeros(2, 8, dtype=torch.bool); selected[0, [0, 3, 6]] = True; selected[1, [2, 7]] = True
    h = attach_esft(copy.deepcopy(base), selected)
    h.model(input_ids=ids, labels=ids).loss.backward()
    for index, delta in h.deltas.items():
        experts = layers[index].experts
        torch.testing.assert_close(delta.gate_up.grad, experts.gate_up_proj.grad[delta.expert_ids], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(delta.down.grad, experts.down_proj.grad[delta.expert_ids], rtol=1e-4, atol=1e-6)
        assert delta.gate_up.grad.abs().sum() > 0
