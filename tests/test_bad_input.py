"Every refused input raises an EPnGError whose message says what to change."
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
import epng
import epng.data


def test_model_without_moe_layer():
    dense = AutoModelForCausalLM.from_config(CONFIG_MAPPING["llama"](
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(epng.NoMoELayerError, match="OLMoE, Qwen2-MoE"):
        epng.attach(dense)


# Every layout flag is supported (tests/test_layouts.py); flags that contradict the tensors are refused. An
# interleaved flag on concatenated weights cannot be told from a real interleaved layout by shape, so it is not here.
@pytest.mark.parametrize("flag, message", [("is_transposed", "transposed"), ("has_gate", "no gate projection"),
                                           ("has_bias", "biases")])
def test_contradicting_expert_layout(tiny, flag, message):
    model = tiny()
    experts = model.model.layers[0].mlp.experts
    setattr(experts, flag, not getattr(experts, flag))
    with pytest.raises(epng.UnsupportedExpertsError, match=message):
        epng.attach(model)


def test_transformers_v4_expert_list():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
    with pytest.raises(epng.UnsupportedExpertsError, match="list of modules"):
        epng.find_moe_layers(Block())


@pytest.mark.parametrize("kwargs, message", [
    (dict(prune_ratio=0.0), "prune_ratio"), (dict(prune_ratio=1.0), "prune_ratio"), (dict(grow_ratio=-0.1), "grow_ratio"),
    (dict(grow_ratio=1.0), "grow_ratio"),
    (dict(prune_ratio=0.6, grow_ratio=0.5), "prune_ratio \\+ grow_ratio"), (dict(rank=0), "rank"), (dict(rank=2.5), "rank"),
    (dict(targets=("gate_proj", "k_proj")), "targets"), (dict(targets=()), "targets"),
    (dict(targets=("up_proj", "up_proj")), "targets"), (dict(cycle_interval=0), "cycle_interval"), (dict(importance_decay=1.5), "importance_decay"),
    (dict(max_rank=4), "max_rank"), (dict(lora_alpha=0), "lora_alpha")])
def test_invalid_config(kwargs, message):
    with pytest.raises(epng.EPnGError, match=message):
        epng.EPnGConfig(**kwargs)


def test_valid_edge_config():
    cfg = epng.EPnGConfig(prune_ratio=0.5, grow_ratio=0.5, importance_decay=0.0, warmup_steps=0)
    assert cfg.prune_ratio + cfg.grow_ratio == 1


@pytest.mark.parametrize("call, message", [
    (lambda h: h.prune(2, 0), "MoE layer 2 does not exist"), (lambda h: h.prune(-1, 0), "does not exist"),
    (lambda h: h.grow(0, 8, 1), "expert 8 does not exist"), (lambda h: h.grow(1, 0, -3), ">= 1"),
    (lambda h: h.grow(0, 0, 1000), "max_rank"), (lambda h: h.factors(0, 0, "down_proj"), "adapted targets"),
    (lambda h: h.prune(0.5, 0), "does not exist")])
def test_prune_grow_outside_the_model(tiny, call, message):
    h = epng.attach(tiny())
    with pytest.raises(epng.EPnGError, match=message):
        call(h)


def test_unknown_model_id():
    with pytest.raises(epng.EPnGError, match="no offline config"):
        epng.offline_config("allenai/OLMoE-1B-7B-0924-Instruct-typo")


def test_unknown_tiny_architecture():
    with pytest.raises(epng.EPnGError, match="unknown architecture"):
        epng.tiny_moe_config("gpt2")


def test_importance_before_any_token(tiny):
    h = epng.attach(tiny())
    with pytest.raises(epng.EPnGError, match="seen no token"):
        h.plan()


def test_plan_for_other_ranks(tiny):
    model = tiny()
    h = epng.attach(model)
    model.train()
    ids = torch.randint(3, 256, (2, 8))
    model(input_ids=ids)
    plan = h.plan()
    h.prune(0, 0)
    with pytest.raises(epng.EPnGError, match="make a new plan"):
        h.apply(plan)


def test_budget_that_cannot_be_met():
    importance = torch.rand(1, 4)
    with pytest.raises(epng.BudgetError, match="max_rank"):
        epng.plan_cycle(importance, torch.full((1, 4), 8), 0.5, 0.25, max_rank=8)


# --- data files, through every entry point that reads one ------------------------------------------------------------

def _readers():
    from epng.eval import load_eval_rows, local_task_configs
    from epng.repro import prefeval_items
    return {"load_rows": epng.load_rows,
            "load_eval_rows": lambda p: load_eval_rows("gsm8k", p),
            "local_task_configs": lambda p: local_task_configs(p.parent / "tasks", arc=p),
            "prefeval_items": prefeval_items}


@pytest.mark.parametrize("reader", ["load_rows", "load_eval_rows", "local_task_configs", "prefeval_items"])
@pytest.mark.parametrize("case", ["utf-16", "gzip bomb", "truncated gzip", "deep nesting", "list row", "too many rows"])
def test_every_reader_names_the_file_and_the_problem(tmp_path, reader, case, monkeypatch):
    import gzip
    monkeypatch.setattr(epng.data, "MAX_JSON_ROWS", 2)
    name = "rows.jsonl.gz" if "gzip" in case else "rows.jsonl"
    path = tmp_path / name
    if case == "utf-16": path.write_text('{"question": "1+1?", "answer": "2"}\n', encoding="utf-16")
    elif case == "gzip bomb":
        with gzip.open(path, "wb") as f:
            for _ in range(40): f.write(b" " * 2**20)                     # 40 MB of one line, 40 kB on disk
    elif case == "truncated gzip": path.write_bytes(gzip.compress(b'{"question": "q", "answer": "a"}\n' * 100)[:-20])
    elif case == "deep nesting": path.write_text('{"question": ' + "[" * 5000 + "]" * 5000 + "}\n")
    elif case == "list row": path.write_text('{"question": "q", "answer": "a"}\n["q", "a"]\n')
    else: path.write_text('{"question": "q", "answer": "a"}\n' * 3)
    message = {"utf-16": "is UTF-16 text", "gzip bomb": "line 1: the line passes the limit",
               "truncated gzip": "is not a complete gzip file", "deep nesting": "line 1 nests lists/objects",
               "list row": "line 2 is a JSON list, not an object",
               "too many rows": "line 3: the number of rows passes the limit of 2 rows"}[case]
    with pytest.raises(epng.EPnGError) as err:
        _readers()[reader](path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_a_planted_adapter_runs_nothing(tmp_path, tiny):
    "Adapter files that hold a pickle payload: parsed as data, refused, and the payload never runs."
    import pickle, shutil
    class Payload:
        def __reduce__(self): return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')",))
    good = epng.save_adapter(epng.attach(tiny()), tmp_path / "good")
    for planted in ["epng_adapter.json", "epng_adapter.safetensors"]:
        folder = tmp_path / planted
        shutil.copytree(good, folder)
        (folder / planted).write_bytes(pickle.dumps(Payload()))
        with pytest.raises(epng.EPnGError, match=f"{planted} is not a usable epng adapter"):
            epng.load_adapter(tiny(), folder)
    assert not (tmp_path / "pwned").exists()
