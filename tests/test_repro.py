"Notebook parameters of the reproduction notebooks (10-13): unknown values stop with a clear EPnGError."
import json
from pathlib import Path
import pytest
from epng.moe import EPnGError
from epng.repro import (resolve_params, check_gpu, prefeval_status, prefeval_score, side_by_side, run_columns,
                        PAPER_RESULTS, EXPERIMENTS)

NBS = Path(__file__).parents[1] / "nbs"
REPRO = ["18a_repro_olmoe", "18b_repro_qwen", "18c_repro_general", "18d_repro_down_proj"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="fast"), "unknown MODE 'fast': choose one of ['auto', 'full', 'smoke']"),
    (dict(mode="Full"), "unknown MODE 'Full'"),
    (dict(methods=["lora"]), "unknown METHODS ['lora']: choose from ['fft', 'esft', 'static', 'epng']"),
    (dict(methods=[]), "no METHODS given"),
    (dict(tasks=["gsm8k", "mmlu"]), "unknown TASKS ['mmlu']"),
    (dict(figures=["fig7"]), "unknown FIGURES ['fig7']"),
    (dict(ranks=[0]), "RANKS [0]"),
    (dict(ranks=[4.5]), "RANKS [4.5]"),
    (dict(fractions=[0.6]), "FRACTIONS [0.6]"),
    (dict(fractions=[True]), "FRACTIONS [True]"),
    (dict(model="olmoe"), "unknown MODEL 'olmoe'"),
    (dict(eval_limit=0), "EVAL_LIMIT must be a whole number >= 1"),
    (dict(max_steps=-1), "MAX_STEPS must be a whole number >= 1"),
])
def test_unknown_parameter_values(kwargs, message):
    with pytest.raises(EPnGError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        resolve_params("olmoe", **{"mode": "smoke", **kwargs})


def test_methods_belong_to_their_table():
    with pytest.raises(EPnGError, match=r"choose from \['esft', 'static', 'epng'\]"):
        resolve_params("qwen", "smoke", methods=["fft"])          # the paper has no FFT row for Qwen
    with pytest.raises(EPnGError, match="unknown TASKS"):
        resolve_params("down_proj", "smoke", tasks=["mbpp"])
    with pytest.raises(EPnGError, match="unknown experiment 'table9'"):
        resolve_params("table9")


def test_auto_mode_and_defaults():
    smoke = resolve_params("olmoe", "auto", cuda=False)
    full = resolve_params("olmoe", "auto", cuda=True)
    assert (smoke.mode, smoke.model, full.mode, full.model) == ("smoke", "embedded", "full", "allenai/OLMoE-1B-7B-0125")
    args = full.train_args("epng", "math", "/tmp/x")
    assert (args.max_steps, args.batch_size * args.grad_accum, args.lr, args.bf16, args.rank) == (500, 32, 1e-4, True, 8)
    assert (args.warmup_steps, args.cycle_interval, args.prune_ratio, args.grow_ratio, args.importance_decay, args.dataset) == (100, 50, 0.2, 0.2, 0.2, "metamathqa")
    assert (full.eval["n"], max(full.eval["k"]), full.eval["temperature"], full.eval["limit"]) == (10, 10, 0.7, None)
    assert resolve_params("olmoe", "smoke", methods="epng").methods == ("epng",)


def test_full_mode_needs_a_gpu():
    with pytest.raises(EPnGError, match="needs a CUDA GPU"):
        check_gpu("full", cuda=False)


def test_prefeval_cell_without_a_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert prefeval_status("items.jsonl") == "not run: no judge key"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert prefeval_status(None) == "not run: no PrefEval file"
    with pytest.raises(EPnGError, match="is not a file"):
        prefeval_status("/nonexistent/prefeval.jsonl")


def test_prefeval_score_with_a_pluggable_judge():
    from epng.train import load_model_and_tokenizer
    model, tok = load_model_and_tokenizer("embedded")
    items = [{"preference": "I am vegetarian.", "question": "What should I cook?"}] * 2
    always_a = lambda messages: "[[A]]"
    # asked in both orders, a judge that always says A never agrees with itself: ties, half a win each
    assert prefeval_score(model, tok, items, ["x", "y"], always_a, max_new_tokens=4) == 50.0


def test_side_by_side_keeps_the_papers_shape():
    runs = {"epng": run_columns({"params": 0.7, "scores": {"gsm8k": 1.0}}, ["params", "gsm8k", "avg"])}
    table = side_by_side("t", PAPER_RESULTS["table1"], runs, ["params", "gsm8k", "avg"])
    assert list(table.rows) == ["fft", "esft", "static", "epng"]
    assert table.rows["epng"]["gsm8k"] == (66.26, 1.0) and table.rows["fft"]["gsm8k"] == (64.97, None)


@pytest.mark.parametrize("name", REPRO)
def test_notebooks_have_colab_badge_parameters_and_metadata(name):
    nb = json.loads((NBS / f"{name}.ipynb").read_text())
    assert "colab" in nb["metadata"] and nb["metadata"].get("accelerator") == "GPU"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and "MODE = \"auto\"" in "".join(tagged[0]["source"])
    text = "".join("".join(c["source"]) for c in nb["cells"])
    assert f"colab.research.google.com/github/epng/epng/blob/main/nbs/{name}.ipynb" in text
    assert "IN_COLAB" in text
