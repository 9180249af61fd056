"Fused experts stored other ways: GPT-OSS (interleaved, transposed, biased), Aria (transposed), Nemotron-H (no gate)."
import copy, inspect
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM
import epng
from epng.moe import find_moe_layers, is_fused_experts
from epng.checkpoint import save_adapter, load_adapter, export_peft

# family: (layout epng reads, weights transposed, expert biases, targets it trains)
LAYOUTS = {"gpt_oss": ("interleaved", True, True, ("gate_proj", "up_proj", "down_proj")),
           "aria_text": ("concatenated", True, False, ("gate_proj", "up_proj", "down_proj")),
           "nemotron_h": ("up only", False, False, ("up_proj", "down_proj"))}
IDS = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0))


def build(family):
    "The tiny model of `family` with visible weights (biases and routers too); skipped where transformers lacks it."
    torch.manual_seed(0)
    try: model = AutoModelForCausalLM.from_config(epng.tiny_moe_config(family))
    except Exception as e: pytest.skip(f"transformers {transformers.__version__} cannot build {family}: {e}")
    if not any(is_fused_experts(m) for m in model.modules()):   # Aria's experts are fused only from transformers 5.2x
        pytest.skip(f"transformers {transformers.__version__} has no fused experts for {family}")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in find_moe_layers(model):
            for p in [*layer.experts.parameters(), layer.router.weight]: p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def logits(model):
    with torch.no_grad(): return model(input_ids=IDS, use_cache=False).logits


def random_b(handle, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in handle.loras:
            for b in lora.B.values(): b.copy_(0.05 * torch.randn(b.shape, generator=g) * (lora.slot_owner >= 0)[:, None])


def attached(family, **kwargs):
    model = build(family)
    base = copy.deepcopy(model)
    return base, epng.attach(model, epng.EPnGConfig(rank=4, targets=LAYOUTS[family][3], **kwargs))


def one_step(handle):
    "One training forward/backward/step (the gate collector counts it) with SGD on the factors."
    handle.model.train()
    opt = torch.optim.SGD(list(handle.parameters()), lr=1.0)
    handle.model(input_ids=IDS, labels=IDS, use_cache=False).loss.backward()
    opt.step(); opt.zero_grad()
    handle.model.eval()


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_the_layout_is_read(family):
    layer = find_moe_layers(build(family))[0]
    layout, transposed, bias, _ = LAYOUTS[family]
    assert (layer.gate_up_layout, bool(layer.experts.is_transposed), bool(layer.experts.has_bias)) == (layout, transposed, bias)
    assert (layer.num_experts, layer.hidden_size, layer.intermediate_size) == (8, 64, 32)


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_zero_b_is_transformers_forward(family):
    "With B = 0 the epng forward is transformers' own grouped forward, bit for bit, and its eager loop to 1e-6."
    base, handle = attached(family)
    grouped = logits(base)
    base.set_experts_implementation("eager")
    torch.testing.assert_close(logits(handle.model), grouped, rtol=0, atol=0)
    torch.testing.assert_close(logits(handle.model), logits(base), rtol=0, atol=1e-6 * float(grouped.abs().max()))


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_a_training_step_changes_outputs_and_merges_exactly(family):
    base, handle = attached(family)
    before = logits(handle.model)
    one_step(handle)                       # B = 0: only B moves on the first step; A's gradient is zero
    one_step(handle)
    after = logits(handle.model)
    assert float((after - before).abs().max()) > 1e-4
    handle.cycle(generator=torch.Generator().manual_seed(0))   # uneven ranks, as after training
    assert int(handle.ranks.sum()) == handle.budget and int(handle.ranks.max()) > 4
    random_b(handle)
    adapted = logits(handle.model)
    merged = logits(handle.merged_model())
    assert float((merged - adapted).abs().max() / adapted.abs().max()) <= 1e-5
    if LAYOUTS[family][2]:                 # the biases are the base model's, untouched
        for mine, theirs in zip(find_moe_layers(handle.model), find_moe_layers(base)):
            assert torch.equal(mine.experts.gate_up_proj_bias, theirs.experts.gate_up_proj_bias)


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_adapter_round_trips(family, tmp_path):
    base, handle = attached(family)
    one_step(handle)
    handle.cycle(generator=torch.Generator().manual_seed(0))
    random_b(handle)
    save_adapter(handle, tmp_path / "adapter")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    assert torch.equal(loaded.ranks, handle.ranks)
    torch.testing.assert_close(logits(loaded.model), logits(handle.model), rtol=0, atol=0)


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_peft_export_reloads_to_the_same_outputs(family, tmp_path):
    peft = pytest.importorskip("peft")
    base, handle = attached(family)
    one_step(handle)
    handle.cycle(generator=torch.Generator().manual_seed(0))
    random_b(handle)
    export_peft(handle, tmp_path / "peft")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    adapted = logits(handle.model)
    assert float((logits(reloaded) - adapted).abs().max() / adapted.abs().max()) <= 1e-4


def test_peft_export_refuses_a_layout_it_would_misread(tmp_path, monkeypatch):
    "If peft read GPT-OSS's (E, in, out) weights as (E, out, in), the export is refused, with what to do instead."
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.layer import ParamWrapper
    if "_did_swap_in_out_features" not in inspect.getsource(ParamWrapper):
        pytest.skip(f"peft {peft.__version__} does not say which way it reads 3-D parameters")
    _, handle = attached("gpt_oss")
    update = ParamWrapper.update_layer
    def misread(self, *args, **kwargs):
        update(self, *args, **kwargs)
        self._did_swap_in_out_features = True
    monkeypatch.setattr(ParamWrapper, "update_layer", misread)
    with pytest.raises(epng.EPnGError, match="merged model"):
        export_peft(handle, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_interleaved_fast_paths_agree():
    "The block-diagonal B (GPUs' choice) and per-token A give GPT-OSS the per-target outputs and gradients."
    _, handle = attached("gpt_oss")
    random_b(handle)
    def run(fast: bool):
        for lora in handle.loras: lora.grouped_b = lora.per_token_a = fast
        for p in handle.parameters(): p.grad = None
        out = handle.model(input_ids=IDS, use_cache=False).logits
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in handle.parameters()]
    (slow_out, slow_grads), (fast_out, fast_grads) = run(False), run(True)
    torch.testing.assert_close(fast_out, slow_out, rtol=1e-5, atol=1e-6)
    for f, s in zip(fast_grads, slow_grads): torch.testing.assert_close(f, s, rtol=1e-4, atol=1e-7)


def test_no_gate_refuses_gate_proj_with_what_to_use():
    model = build("nemotron_h")
    with pytest.raises(epng.UnsupportedExpertsError) as e:
        epng.attach(model)                                  # the default targets: gate_proj and up_proj
    message = str(e.value)
    assert "no gate projection" in message and "('gate_proj', 'up_proj')" in message
    assert "targets=('up_proj',) or ('up_proj', 'down_proj')" in message
    assert not hasattr(find_moe_layers(model)[0].experts, "epng_lora")   # refused before anything was installed
    handle = epng.attach(model, epng.EPnGConfig(targets=("up_proj",)))
    assert set(handle.loras[0].shapes) == {"up_proj"}


def test_expert_parallel_stays_refused():
    model = build("gpt_oss")
    find_moe_layers(model)[0].experts._is_expert_parallel = True
    with pytest.raises(epng.UnsupportedExpertsError, match="expert parallelism"):
        epng.attach(model)


def test_shapes_that_do_not_fit_the_layout_are_refused(tiny):
    "An OLMoE that claims transposed weights: its (E, 2I, H) and (E, H, I) do not fit (E, in, out)."
    model = tiny()
    model.model.layers[0].mlp.experts.is_transposed = True
    with pytest.raises(epng.UnsupportedExpertsError, match="transposed"):
        epng.attach(model)


@pytest.mark.parametrize("target, columns", [("gate_proj", 0), ("up_proj", 1)])
def test_interleaved_targets_land_in_their_columns(target, columns):
    "GPT-OSS: LoRA on gate changes only the even output columns of gate_up_proj (stored (E, H, 2I)), on up only the odd."
    model = build("gpt_oss")
    base = copy.deepcopy(model)
    handle = epng.attach(model, epng.EPnGConfig(rank=4, targets=(target,)))
    random_b(handle)
    merged = find_moe_layers(handle.merged_model())[0].experts.gate_up_proj
    delta = (merged - find_moe_layers(base)[0].experts.gate_up_proj).abs()
    assert float(delta[..., columns::2].min()) > 0 and float(delta[..., 1 - columns::2].max()) == 0


# ESFT and full fine-tuning (notebook 11a) on the same layouts
def esft_attached(family, top_p=0.3):
    "A tiny model of `family`, a copy of it, and ESFT on the experts its token scores select at `top_p`."
    from epng.baselines import attach_esft, esft_scores, select_esft_experts
    model = build(family)
    base = copy.deepcopy(model)
    selected = select_esft_experts(esft_scores(model, [{"input_ids": IDS}]), top_p)
    assert 0 < int(selected.sum()) < selected.numel()
    return base, attach_esft(model, selected)


def random_deltas(handle, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters(): p.copy_(0.05 * torch.randn(p.shape, generator=g))


def expert_outputs(model):
    "Every expert of every MoE layer alone on the same inputs: (MoE layers × experts) outputs."
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return [[layer.experts(x, torch.full((6, 1), e), torch.ones(6, 1)) for e in range(layer.num_experts)]
                for layer in find_moe_layers(model)]


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_esft_zero_delta_is_the_plain_model(family):
    base, handle = esft_attached(family)
    torch.testing.assert_close(logits(handle.model), logits(base), rtol=0, atol=0)
    layer = find_moe_layers(base)[0]
    gates = 1 if LAYOUTS[family][0] == "up only" else 2        # no gate: each expert has up and down only
    assert handle.num_trainable() == int(handle.selected.sum()) * (gates + 1) * layer.hidden_size * layer.intermediate_size
    assert not any(p.requires_grad for n, p in handle.model.named_parameters() if ".epng_esft." not in n)


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_esft_step_changes_only_the_selected_experts(family):
    base, handle = esft_attached(family)
    before = expert_outputs(handle.model)
    one_step(handle)
    changed = torch.tensor([[not torch.equal(a, b) for a, b in zip(*rows)]
                            for rows in zip(before, expert_outputs(handle.model))])
    assert torch.equal(changed, handle.selected)
    assert all(p.grad is None for n, p in handle.model.named_parameters() if ".epng_esft." not in n)


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_esft_delta_gradient_is_the_weight_gradient(family):
    "∂L/∂D_e is ∂L/∂W_e of the fused tensors in their own layout (transposed, interleaved or up only)."
    base, handle = esft_attached(family)
    ref = copy.deepcopy(base)
    ref(input_ids=IDS, labels=IDS, use_cache=False).loss.backward()
    handle.model(input_ids=IDS, labels=IDS, use_cache=False).loss.backward()
    for layer in find_moe_layers(ref):
        delta = handle.deltas[layer.index]
        for d, w in [(delta.gate_up, epng.moe.fused_weight(layer.experts, "up_proj")), (delta.down, layer.experts.down_proj)]:
            assert d.shape == (len(delta.expert_ids), *w.shape[1:])   # a slice of the fused tensor, as stored
            torch.testing.assert_close(d.grad, w.grad[delta.expert_ids], rtol=1e-4, atol=1e-7)
            assert float(d.grad.abs().sum()) > 0


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_esft_merges_exactly_and_leaves_the_rest(family):
    base, handle = esft_attached(family)
    random_deltas(handle)
    adapted = logits(handle.model)
    merged_model = handle.merged_model()
    merged = logits(merged_model)
    assert float((merged - adapted).abs().max() / adapted.abs().max()) <= 1e-5
    assert float((adapted - logits(base)).abs().max()) > 1e-3
    assert not any("epng" in n for n in merged_model.state_dict())
    after, first = dict(merged_model.named_parameters()), epng.moe.fused_name(find_moe_layers(base)[0].experts, "up_proj")
    moved = []
    for name, p in base.named_parameters():                # biases, routers, attention: bit-identical
        if name.endswith((f"experts.{first}", "experts.down_proj")): moved.append((after[name] != p).flatten(1).any(1))
        else: assert torch.equal(after[name], p), name
    assert torch.equal(torch.stack(moved).view(-1, 2, 8).any(1), handle.selected)


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_esft_state_round_trips(family, tmp_path):
    from epng.baselines import attach_esft
    base, handle = esft_attached(family)
    one_step(handle)
    random_deltas(handle)
    torch.save(handle.state_dict(), tmp_path / "esft.pt")
    state = torch.load(tmp_path / "esft.pt")
    again = attach_esft(copy.deepcopy(base), state["selected"])
    again.load_state_dict(state)
    torch.testing.assert_close(logits(again.model), logits(handle.model), rtol=0, atol=0)


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_fft_trains_every_weight(family):
    "Full fine-tuning: every parameter (expert biases and routers too) learns; its state loads into a fresh copy."
    from epng.baselines import attach_fft
    base = build(family)
    fft = attach_fft(copy.deepcopy(base))
    assert fft.num_trainable() == epng.moe.count_parameters(base)
    one_step(fft)
    moved = {n for (n, p), q in zip(fft.model.named_parameters(), base.parameters()) if not torch.equal(p, q)}
    experts = [n for n, _ in base.named_parameters() if ".experts." in n]
    assert set(experts) <= moved and any(n.endswith("_bias") for n in experts) == LAYOUTS[family][2]
    again = copy.deepcopy(base)
    again.load_state_dict(fft.state_dict())
    torch.testing.assert_close(logits(again), logits(fft.model), rtol=0, atol=0)
