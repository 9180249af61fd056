"The coverage table (scripts/coverage.py): one family per router kind and layout here, every family with EPNG_SLOW=1."
import collections, functools, importlib.util, os, sys, types
from pathlib import Path
import pytest
import torch
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, __version__ as TRANSFORMERS
from epng.gates import GateCollector

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "coverage.py"
_spec = importlib.util.spec_from_file_location("epng_coverage", SCRIPT)
COVERAGE = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)   # its dataclass looks its module up
_spec.loader.exec_module(COVERAGE)


@pytest.fixture(scope="module")
def coverage(): return COVERAGE


# one family per router kind and layout: the score function of each MoE layer, read from transformers' modeling code
ATTACHED = {"olmoe": "softmax", "deepseek_v3": "sigmoid", "deepseek_v4": "hash, sqrtsoftplus",
            "gemma4_text": "probabilities",
            "inkling_text": "sigmoid", "zaya": "softmax",   # routers that score a shared / null expert besides the E
            # expert layouts: interleaved + transposed + biases, transposed, no gate
            "gpt_oss": "softmax", "aria_text": "softmax", "nemotron_h": "sigmoid"}
BIASED = {"deepseek_v3", "deepseek_v4", "inkling_text", "zaya", "nemotron_h"}   # a correction bias (and for V3 expert
                                                                                # groups) steers the choice


def lacking(family: str) -> str | None:
    "Why this transformers has no `family` for the table to check, or None when it has it."
    if family not in CONFIG_MAPPING: return f"transformers {TRANSFORMERS} has no {family} models"
    module = COVERAGE.modeling_module(family)
    if module is None or not COVERAGE.fused_experts_classes(module):   # e.g. Aria's experts in 5.7
        return f"transformers {TRANSFORMERS} has no fused experts (use_experts_implementation) in {family}"
    return None

PRESENT = [f for f in ATTACHED if lacking(f) is None]   # an older transformers lacks some families


def known(families):
    "`families` as test parameters, each skipped (with the reason) where this transformers lacks it."
    return [pytest.param(f, marks=pytest.mark.skipif(lacking(f) is not None, reason=lacking(f) or ""))
            for f in families]


@pytest.fixture(scope="module")
def subset(coverage, tmp_path_factory):
    out = tmp_path_factory.mktemp("coverage") / "coverage.md"
    rows = coverage.main(["--families", *PRESENT, "--out", str(out)])
    return {r.family: r for r in rows}, out.read_text(encoding="utf-8")


def test_the_families_are_found_generically(coverage):
    families, skipped = coverage.moe_families()
    assert set(PRESENT) <= set(families)
    assert "gemma4" not in families and "gemma4_text" in families        # a multimodal config: its text part
    assert not set(families) & {"gemma4_vision", "qwen3_vl_moe_vision"}  # parts without experts or a causal LM
    assert "qwen3_vl_moe" in skipped                                     # fused experts, no causal-LM class


def test_tiny_configs_are_tiny(coverage):
    config = coverage.tiny_config("deepseek_v3")
    sizes = (config.hidden_size, config.num_hidden_layers, config.n_routed_experts, config.num_experts_per_tok)
    assert sizes == (64, 2, 8, 2)
    assert (config.vocab_size, config.first_k_dense_replace, config.n_group, config.topk_group) == (256, 0, 2, 1)
    assert config.head_dim == config.qk_rope_head_dim == 8          # a derived field stays derived


@pytest.mark.parametrize("family", known(ATTACHED))
def test_attached_families_are_faithful_and_export(subset, family):
    row = subset[0][family]
    assert row.attach.startswith("ok"), row.attach
    assert row.router == row.reference_router == ATTACHED[family]
    assert row.faithful and all(getattr(row, i).startswith("yes") for i in ("gate", "selection", "weight")), \
        (row.gate, row.selection, row.weight)
    assert (row.departure not in ("0%", "n/a")) == (family in BIASED), row.departure
    assert row.merged.startswith("ok") and row.cycle.startswith("ok"), (row.merged, row.cycle)
    pytest.importorskip("peft")
    assert row.peft.startswith("ok"), row.peft


def test_experts_without_a_gate_are_checked_on_up_and_down(subset):
    "Nemotron-H refuses the default targets (gate_proj, up_proj): the row says so and checks up_proj, down_proj."
    row = subset[0]["nemotron_h"]
    assert any("default targets ('gate_proj', 'up_proj') are refused" in n and "('up_proj', 'down_proj')" in n
               for n in row.notes), row.notes


def test_the_table_says_what_was_run(subset):
    _, text = subset
    import torch, transformers
    assert f"transformers {transformers.__version__}, torch {torch.__version__}" in text
    assert "--families " + " ".join(PRESENT) in text
    n = len(PRESENT)
    assert f"{n} of {n} families attach; refused: 0;" in text and "Importance NOT faithful to the router: none." in text
    assert all(text.count(f"| {family} |") == 1 for family in PRESENT)


def test_the_default_size_column_says_what_the_meta_model_has(subset):
    "Every family is attached at its default size on the meta device; DeepSeek-V3's cell is its config's own shapes."
    rows, text = subset
    assert "| default size (meta) |" in text
    assert all(r.default_size.startswith("ok (") for r in rows.values()), {f: r.default_size for f, r in rows.items()}
    assert not [n for r in rows.values() for n in r.notes if "not on the meta device" in n]   # no weight in memory
    c = AutoConfig.for_model("deepseek_v3")
    n, shape = c.num_hidden_layers - c.first_k_dense_replace, (c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
    with torch.device("meta"): base = sum(p.numel() for p in AutoModelForCausalLM.from_config(c).parameters())
    lora = n * c.n_routed_experts * 8 * 2 * (c.hidden_size + c.moe_intermediate_size)   # rank 8 on gate and up
    row = rows["deepseek_v3"]
    assert row.default_shapes == [shape] * n
    assert row.default_size == f"ok ({n} × {shape}; {base / 1e9:.1f} B; {lora / base:.2%})", row.default_size


@pytest.mark.skipif(lacking("ernie4_5_vl_moe") is not None, reason=lacking("ernie4_5_vl_moe") or "")
def test_experts_of_different_widths_attach_at_default_size(coverage):
    """Ernie 4.5-VL (not in the table: no causal-LM class) has text and vision experts of different widths in every
    sparse layer: at its default size the check finds both and attach takes them (their budget counts parameters)."""
    row = coverage.check_other("ernie4_5_vl_moe")
    text = AutoConfig.for_model("ernie4_5_vl_moe").get_text_config()
    sparse = text.mlp_layer_types.count("sparse")
    shapes = [(text.moe_num_experts, text.hidden_size, i) for i in text.moe_intermediate_size]
    assert len(set(shapes)) == 2 and collections.Counter(row.default_shapes) == dict.fromkeys(shapes, sparse)
    assert row.default_size.startswith("ok (") and all(f"{sparse} × {s}" in row.default_size for s in shapes), \
        row.default_size
    assert "Of these, MoE layers of different (E, H, I) at default size: ernie4_5_vl_moe;" in "\n".join(
        coverage.other_summary([row]))


def test_a_reading_that_disagrees_is_listed(coverage, monkeypatch):
    "If epng read a sigmoid router as a softmax one, the row and the summary say so."
    monkeypatch.setattr(GateCollector, "_reading", lambda self, layer, *outputs: (self.importance, "softmax"))
    row = coverage.check_family("deepseek_v3")
    assert row.attach.startswith("ok") and row.faithful is False
    assert row.router == "softmax" and row.reference_router == "sigmoid" and "NOT faithful" in row.gate
    assert "Importance NOT faithful to the router: deepseek_v3." in coverage.summary([row])


def rerouted(coverage, monkeypatch, call_router: bool):
    """Make coverage's tiny models route as many blocks of transformers 5.7 do: the block calls a router that returns
    only logits (DeepSeek-V3's), or never calls it (DeepSeek-V2's), chooses the top-2 of the softmax itself and hands
    the experts `(hidden, index, weights)`. Bound methods, so that the model's deep copies route the same way."""
    learned_looking = coverage.learned_looking
    def logits_only(router, x): return type(router).forward(router, x)[0]
    def block_forward(block, h, router=None):
        flat = h.reshape(-1, h.shape[-1])
        logits = router(flat) if call_router else torch.nn.functional.linear(flat, router.weight)
        weights, index = logits.softmax(-1).topk(2, dim=-1)
        return block.experts(flat, index, weights).reshape(h.shape)
    def routed_by_the_block(model, layers, seed=0):
        learned_looking(model, layers, seed)
        for layer in layers:
            layer.router.forward = types.MethodType(logits_only, layer.router)
            layer.block.forward = types.MethodType(functools.partial(block_forward, router=layer.router), layer.block)
    monkeypatch.setattr(coverage, "learned_looking", routed_by_the_block)


def test_a_router_that_returns_only_logits_is_checked_on_the_choice_its_block_makes(coverage, monkeypatch):
    rerouted(coverage, monkeypatch, call_router=True)
    row = coverage.check_family("olmoe")
    assert row.attach.startswith("ok") and row.router == row.reference_router == "softmax", (row.attach, row.router)
    assert row.faithful and all(getattr(row, i).startswith("yes") for i in ("gate", "selection", "weight"))
    assert row.merged.startswith("ok") and row.cycle.startswith("ok"), (row.merged, row.cycle)


def test_a_block_that_never_calls_its_router_is_refused(coverage, monkeypatch):
    "A block that multiplies by its router's weight itself (DeepSeek-V2's in transformers 5.7) is listed as refused."
    rerouted(coverage, monkeypatch, call_router=False)
    row = coverage.check_family("olmoe")
    assert row.attach.startswith("refused: the experts of MoE layer 0") and "was never called" in row.attach, row.attach
    assert row.refusal_kind == "EPnGError" and any("attach succeeds" in n for n in row.notes), row.notes
    assert row.router == row.gate == row.merged == ""                 # nothing after the refusal is claimed
    assert "refused: 1;" in coverage.summary([row])[0]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("EPNG_SLOW") != "1", reason="the full sweep: set EPNG_SLOW=1")
def test_full_sweep(coverage, tmp_path):
    rows = coverage.main(["--out", str(tmp_path / "coverage.md")])
    attached = [r for r in rows if r.attach.startswith("ok")]
    assert attached and all(r.faithful for r in attached), [r.family for r in attached if not r.faithful]
    assert not [r.family for r in rows if r.refusal_kind == "NoMoELayerError"]   # every family has fused experts
    assert all(r.merged.startswith("ok") and r.cycle.startswith("ok") for r in attached)
