"The coverage table (scripts/coverage.py): one family per router kind and layout here, every family with EPNG_SLOW=1."
import importlib.util, os, sys
from pathlib import Path
import pytest
from epng.gates import GateCollector

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "coverage.py"


@pytest.fixture(scope="module")
def coverage():
    spec = importlib.util.spec_from_file_location("epng_coverage", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # its dataclass looks its module up while the class is made
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


# one family per router kind and layout: the score function of each MoE layer, read from transformers' modeling code
ATTACHED = {"olmoe": "softmax", "deepseek_v3": "sigmoid", "deepseek_v4": "hash, sqrtsoftplus",
            "gemma4_text": "probabilities",
            "inkling_text": "sigmoid", "zaya": "softmax"}   # routers that score a shared / null expert besides the E
BIASED = {"deepseek_v3", "deepseek_v4", "inkling_text", "zaya"}    # a correction bias (and for V3 expert groups) steers the choice
REFUSED = {"gpt_oss": ("interleaved", "transposed", "expert biases")}   # the layout, named


@pytest.fixture(scope="module")
def subset(coverage, tmp_path_factory):
    out = tmp_path_factory.mktemp("coverage") / "coverage.md"
    rows = coverage.main(["--families", *ATTACHED, *REFUSED, "--out", str(out)])
    return {r.family: r for r in rows}, out.read_text(encoding="utf-8")


def test_the_families_are_found_generically(coverage):
    families, skipped = coverage.moe_families()
    assert set(ATTACHED) | set(REFUSED) <= set(families)
    assert "gemma4" not in families and "gemma4_text" in families        # a multimodal config: its text part
    assert not set(families) & {"gemma4_vision", "qwen3_vl_moe_vision"}  # parts without experts or a causal LM
    assert "qwen3_vl_moe" in skipped                                     # fused experts, no causal-LM class


def test_tiny_configs_are_tiny(coverage):
    config = coverage.tiny_config("deepseek_v3")
    sizes = (config.hidden_size, config.num_hidden_layers, config.n_routed_experts, config.num_experts_per_tok)
    assert sizes == (64, 2, 8, 2)
    assert (config.vocab_size, config.first_k_dense_replace, config.n_group, config.topk_group) == (256, 0, 2, 1)
    assert config.head_dim == config.qk_rope_head_dim == 8          # a derived field stays derived


@pytest.mark.parametrize("family", list(ATTACHED))
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


@pytest.mark.parametrize("family", list(REFUSED))
def test_a_refusal_names_the_layout(subset, family):
    row = subset[0][family]
    assert row.attach.startswith("refused") and row.refusal_kind == "UnsupportedExpertsError", row.attach
    assert "no MoE layer" not in row.attach and all(word in row.attach for word in REFUSED[family]), row.attach


def test_the_table_says_what_was_run(subset):
    _, text = subset
    import torch, transformers
    assert f"transformers {transformers.__version__}, torch {torch.__version__}" in text
    assert "--families " + " ".join([*ATTACHED, *REFUSED]) in text
    assert "6 of 7 families attach; refused: 1;" in text and "Importance NOT faithful to the router: none." in text
    assert all(text.count(f"| {family} |") == 1 for family in [*ATTACHED, *REFUSED])


def test_a_reading_that_disagrees_is_listed(coverage, monkeypatch):
    "If epng read a sigmoid router as a softmax one, the row and the summary say so."
    monkeypatch.setattr(GateCollector, "_reading", lambda self, layer, *outputs: (self.importance, "softmax"))
    row = coverage.check_family("deepseek_v3")
    assert row.attach.startswith("ok") and row.faithful is False
    assert row.router == "softmax" and row.reference_router == "sigmoid" and "NOT faithful" in row.gate
    assert "Importance NOT faithful to the router: deepseek_v3." in coverage.summary([row])


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("EPNG_SLOW") != "1", reason="the full sweep: set EPNG_SLOW=1")
def test_full_sweep(coverage, tmp_path):
    rows = coverage.main(["--out", str(tmp_path / "coverage.md")])
    attached = [r for r in rows if r.attach.startswith("ok")]
    assert attached and all(r.faithful for r in attached), [r.family for r in attached if not r.faithful]
    assert not [r.family for r in rows if r.refusal_kind == "NoMoELayerError"]   # every family has fused experts
    assert all(r.merged.startswith("ok") and r.cycle.startswith("ok") for r in attached)
