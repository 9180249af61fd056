"Importance follows the router that is there: softmax, sigmoid or √softplus scores, correction bias, groups, hash layers."
import importlib.util, sys, warnings
from pathlib import Path
import pytest
import torch
from transformers import AutoModelForCausalLM
import epng
from epng.gates import GateCollector, IMPORTANCE

_spec = importlib.util.spec_from_file_location("coverage_script", Path(__file__).resolve().parents[1] / "scripts" / "coverage.py")
COVERAGE = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)   # its dataclasses look their module up
_spec.loader.exec_module(COVERAGE)

# the score function each family's modeling code applies (read from transformers 5.24), written out independently of
# epng, which infers it from the router's output; per MoE layer, "hash" for a layer that chooses by token id
BIASED = {"deepseek_v3", "minimax_m2", "afmoe", "deepseek_v4"}   # a correction bias steers their choice
FAMILIES = {"olmoe": ["softmax"] * 2, "qwen2_moe": ["softmax"] * 2, "hunyuan_v1_moe": ["softmax"] * 2,
            "deepseek_v3": ["sigmoid"] * 2, "minimax_m2": ["sigmoid"] * 2, "afmoe": ["sigmoid"] * 2,
            "deepseek_v4": ["hash", "sqrtsoftplus"], "gemma4_text": ["probabilities"] * 2}
REFERENCE_SCORES, spearman = COVERAGE.REFERENCE_SCORES, COVERAGE.spearman   # written out independently of epng


def learned_looking(arch: str, seed: int = 0):
    "A tiny model of `arch` whose routers have logits of order one and a non-zero correction bias (std 0.3)."
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(epng.tiny_moe_config(arch)).train()
    layers = epng.find_moe_layers(model)
    COVERAGE.learned_looking(model, layers, seed)   # the coverage table's routers are made the same way
    return model, layers


def record_router_outputs(layers):
    """Hooks that keep every training-mode routing call's (logits, weights, index) per layer; returns (store, hooks).
    A router that returns only logits leaves the choice to its block: the weights and index are then the ones the
    block hands its experts, `experts(hidden_states, top_k_index, top_k_weights)`."""
    store = {layer.index: [] for layer in layers}
    keep = lambda ts: tuple(t.detach().float() if t.is_floating_point() else t.detach() for t in ts)
    def router_hook(layer):
        def hook(module, args, output):
            if module.training and torch._C._current_graph_task_id() == -1:
                store[layer.index].append(keep(output[:3]) if isinstance(output, tuple) else [output.detach().float()])
        return hook
    def experts_hook(layer):
        def hook(module, args, kwargs):
            calls = store[layer.index]
            if calls and isinstance(calls[-1], list):   # the logits of this call wait for the block's choice
                index, weights = (*args[1:3], kwargs.get("top_k_index"), kwargs.get("top_k_weights"))[:2]
                calls[-1] = (*calls[-1], *keep((weights, index)))
        return hook
    return store, [*(layer.router.register_forward_hook(router_hook(layer)) for layer in layers),
                   *(layer.experts.register_forward_pre_hook(experts_hook(layer), with_kwargs=True) for layer in layers)]


def reference(outputs, score: str, importance: str, num_experts: int) -> torch.Tensor:
    "Mean per-expert reading of one layer, straight from its router outputs and the family's known score function."
    logits = torch.cat([o[0] for o in outputs]); weights = torch.cat([o[1] for o in outputs])
    index = torch.cat([o[2] for o in outputs]).long()
    if importance == "gate" and score != "hash":
        s = REFERENCE_SCORES[score](logits)
        return (s / s.sum(-1, keepdim=True)).mean(0)
    share = (torch.full(index.shape, 1 / index.shape[1]) if importance in ("gate", "selection")
             else weights / weights.sum(-1, keepdim=True))
    return torch.zeros(len(logits), num_experts).scatter_add_(1, index, share).mean(0)


def train_forwards(model, steps: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(3, 256, (4, 16), generator=g)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()


def known(archs):
    "`archs` as test parameters, each skipped where this transformers has no such model family."
    from transformers import CONFIG_MAPPING, __version__
    return [pytest.param(a, marks=pytest.mark.skipif(a not in CONFIG_MAPPING,
                                                     reason=f"transformers {__version__} has no {a} models"))
            for a in archs]


@pytest.mark.parametrize("arch", known(FAMILIES))
def test_each_reading_follows_the_router(arch):
    model, layers = learned_looking(arch)
    store, hooks = record_router_outputs(layers)
    tables, collectors = {}, []
    for importance in IMPORTANCE:
        tables[importance] = epng.ExpertImportance(len(layers), layers[0].num_experts)
        collectors.append(GateCollector(model, layers, tables[importance].add, importance=importance))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_forwards(model)
    for h in hooks: h.remove()
    assert any("chooses other experts" in str(w.message) for w in caught) == (arch in BIASED)   # 'gate' says so
    test_kinds = collectors[0].kinds
    for c in collectors: c.remove()
    assert test_kinds == dict(enumerate(FAMILIES[arch]))
    for importance, table in tables.items():
        for layer in layers:
            expected = reference(store[layer.index], FAMILIES[arch][layer.index], importance, layer.num_experts)
            got = table.mean()[layer.index]
            assert spearman(got, expected) >= 0.99, (importance, layer.index)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_spearman_helper():
    x = torch.tensor([0.1, 0.4, 0.4, 0.9, 0.2])
    assert spearman(x, x ** 3) == pytest.approx(1) and spearman(x, -x) == pytest.approx(-1)
    assert abs(spearman(torch.arange(8.), torch.tensor([3., 7, 0, 5, 1, 6, 2, 4]))) < 0.5


@pytest.mark.parametrize("arch", known(sorted(BIASED)))
def test_selection_prunes_the_least_selected(arch):
    model, layers = learned_looking(arch)
    handle = epng.attach(model, epng.EPnGConfig(importance="selection", prune_ratio=0.25, grow_ratio=0.25))
    assert handle.collector.importance == "selection"   # attach passes config.importance to the handle's collector
    store, hooks = record_router_outputs(handle.layers)
    train_forwards(model)
    for h in hooks: h.remove()
    chosen = torch.stack([torch.bincount(torch.cat([o[2] for o in store[l.index]]).flatten(), minlength=l.num_experts)
                          for l in handle.layers]).float()
    plan = handle.cycle()
    assert int(plan.pruned.sum()) == int(0.25 * chosen.numel())
    assert chosen[plan.pruned].max() <= chosen[~plan.pruned].min()    # the least chosen, ties broken either way
    # epng before it read routers: a softmax of the raw logits, whatever the router; it prunes other experts here
    softmax_mean = torch.stack([torch.cat([o[0] for o in store[l.index]]).softmax(-1).mean(0) for l in handle.layers])
    before = epng.plan_cycle(softmax_mean, plan.ranks_before, 0.25, 0.25).pruned
    assert not torch.equal(before, plan.pruned)


def test_unknown_score_function_is_refused_under_gate(tiny):
    model = tiny().train()
    layers = epng.find_moe_layers(model)
    # a router whose weights follow no known function of its logits (a hook that replaces its output runs first)
    noise = [l.router.register_forward_hook(lambda m, a, o: (o[0], torch.rand_like(o[1]) + 0.1, o[2])) for l in layers]
    ids = torch.randint(3, 256, (2, 8))
    gate = GateCollector(model, layers, lambda *a: None)
    with pytest.raises(epng.EPnGError, match="importance='selection' or 'weight'"):
        model(input_ids=ids)
    gate.remove()
    sums = epng.ExpertImportance(len(layers), layers[0].num_experts)
    selection = GateCollector(model, layers, sums.add, importance="selection")
    model(input_ids=ids)
    selection.remove()
    for h in noise: h.remove()
    torch.testing.assert_close(sums.mean().sum(1), torch.ones(len(layers)))
    assert selection.kinds == {0: "unknown", 1: "unknown"}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_looped_layers_count_every_routing_call(tiny, checkpointing):
    "A model that runs its decoder layers twice per forward (as looped models do) routes, and counts, twice per layer."
    model = tiny().train()
    layers = epng.find_moe_layers(model)
    model.model.layers = torch.nn.ModuleList([*model.model.layers, *model.model.layers])
    model.config.num_hidden_layers *= 2
    if checkpointing: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sums = epng.ExpertImportance(len(layers), layers[0].num_experts)
    collector = GateCollector(model, layers, sums.add)
    calls = []
    spy = layers[0].router.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(3, 256, (2, 8)); mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
    spy.remove(); collector.remove()
    assert len(calls) == (4 if checkpointing else 2)     # checkpointing re-runs both passes during backward
    torch.testing.assert_close(sums.counts, torch.full((len(layers),), 2 * 13.))   # 13 real tokens, routed twice


def test_inner_model_forwards_count_with_the_right_mask(tiny):
    model = tiny().train()
    layers = epng.find_moe_layers(model)
    ids = torch.randint(3, 256, (2, 8)); mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    # an outer model that hands its inner model no 2-D mask (as a wrapper that builds its own 4-D mask might)
    drop = model.model.register_forward_pre_hook(lambda m, a, kw: (a, {**kw, "attention_mask": None}), with_kwargs=True)
    sums = epng.ExpertImportance(len(layers), layers[0].num_experts)
    collector = GateCollector(model, layers, sums.add)
    model(input_ids=ids, attention_mask=mask)                   # the outer's mask counts: 13 real tokens
    drop.remove()
    model.model(input_ids=ids, attention_mask=mask)             # the inner model alone, with its own mask: 13 more
    model.model(input_ids=ids)                                  # and without one: all 16
    collector.remove()
    torch.testing.assert_close(sums.counts, torch.full((len(layers),), 13. + 13 + 16))


def test_a_settled_router_is_not_checked_again(monkeypatch):
    "Once a layer's score function is clear, later calls only sum: no inference, no departure, no host copies."
    import epng.gates as gates
    model, layers = learned_looking("deepseek_v3")
    checks = []
    misfits, departure = gates._misfits, gates.selection_departure
    monkeypatch.setattr(gates, "_misfits", lambda *a: checks.append("misfit") or misfits(*a))
    monkeypatch.setattr(gates, "selection_departure", lambda *a: checks.append("departure") or departure(*a))
    sums = epng.ExpertImportance(len(layers), layers[0].num_experts)
    collector = GateCollector(model, layers, sums.add, importance="selection")
    train_forwards(model, steps=1)
    assert checks == ["misfit", "departure"] * len(layers)
    train_forwards(model, steps=2)
    collector.remove()
    assert len(checks) == 2 * len(layers) and collector.kinds == {0: "sigmoid", 1: "sigmoid"}
    torch.testing.assert_close(sums.counts, torch.full((len(layers),), 3 * 64.))


def test_a_block_that_never_calls_its_router_is_refused(tiny):
    "A block that multiplies by its router's weight itself (DeepSeek-V2's in transformers 5.7): nothing to read."
    model = tiny().train()
    layers = epng.find_moe_layers(model)
    for layer in layers:
        block = layer.block
        def forward(h, block=block):
            flat = h.reshape(-1, h.shape[-1])
            probs = torch.nn.functional.linear(flat, block.gate.weight).softmax(-1)
            weights, index = probs.topk(2, dim=-1)
            return block.experts(flat, index, weights).reshape(h.shape)
        block.forward = forward
    collector = GateCollector(model, layers, lambda *a: None, importance="selection")
    with pytest.raises(epng.EPnGError, match="was never called"):
        model(input_ids=torch.randint(3, 256, (2, 8)))
    model.eval()
    model(input_ids=torch.randint(3, 256, (2, 8)))   # evaluation does not count, so it is not refused
    collector.remove()
