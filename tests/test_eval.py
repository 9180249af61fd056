"""Evaluation (epng.eval): answer extraction against lm-eval-harness's own code, pass@k, generation, lm-eval wiring,
judging (the code runner and evaluate_code: tests/test_sandbox.py). Offline: tests/conftest.py blocks the hub; nothing
here opens a network connection."""
import ast
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

import epng
from epng.moe import EPnGError
from epng.data import byte_tokenizer
import epng.eval as ev
from epng.eval import EVAL_SETS, INVALID_MATH, evaluate_gsm8k, evaluate_math, extract_gsm8k, extract_math_answer, final_answer_sentence, generate, gsm8k_correct, last_boxed, load_eval_rows, math_correct, math_gold, normalize_math_answer, pass_at_k, strip_boxed
from epng.judge import OpenAIJudge, VerdictError, judge_pair, pairwise_judge_prompt, pairwise_win_rate, parse_verdict

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval-harness 0.4.13 is the reference: pip install lm-eval==0.4.13")
LM_EVAL_DIR = Path(lm_eval.__file__).parent


# --- GSM8K: our extraction and exact match against lm-eval's RegexFilter and exact_match ---------------------------

GSM8K_CASES = [  # (generation, reference answer): written for this test
    ("The answer is: 18", "#### 18"), ("#### 18", "#### 18"), ("so she has 18 eggs.\n#### 18", "#### 18"),
    ("She pays $1,200 in total.", "#### 1200"), ("#### 1,200", "#### 1200"), ("#### $1,200.", "#### 1200"),
    ("Total is 5 + 7 = 12.", "#### 12"), ("Total is 5 + 7 = 12. Then 12 * 2 = 24", "#### 24"),
    ("The answer is -3", "#### -3"), ("#### -3", "#### -3"), ("temperature fell to -3.", "#### -3"),
    ("It costs $3.50 each", "#### 3.5"), ("It costs 3.50", "#### 3.50"), ("2.5 hours", "#### 2.5"),
    ("no number at all", "#### 4"), ("", "#### 0"), ("#### 7\n#### 8", "#### 7"), ("#### 7\n#### 8", "#### 8"),
    ("The final answer is 1,000,000", "#### 1000000"), ("approximately 3.14159", "#### 3.14159"),
    ("He has 4 apples and 5 pears, so 9 fruits", "#### 9"), ("9 fruits. Question: next one 12", "#### 9"),
    ("#### 42.", "#### 42"), ("#### 42.0", "#### 42"), ("The answer is: 42.0", "#### 42.0"),
    ("x = 1, y = 2", "#### 2"), ("answer: 5.", "#### 5"), ("answer:5", "#### 5"), ("$5", "#### 5"),
    ("$$", "#### 0"), ("..", "#### 0"), ("a,b,c", "#### 0"), ("The answer is 0", "#### 0"),
    ("#### 0", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"),
    ("So Natalia sold 72 clips.", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"),
    ("#### 72", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"),
    ("The profit is 1,5", "#### 15"), ("#### -0.5", "#### -.5"), ("It is 007", "#### 7"),
    ("#### 10 dollars", "#### 10"), ("####10", "#### 10"), ("#### ten", "#### 10"),
    ("She needs 3 more. THE ANSWER IS 3", "#### 3"), ("Result: 12-4", "#### -4"), ("Result: 12 - 4 = 8", "#### 8"),
    ("1.2.3", "#### 1.2.3"), ("The year was 2,024.", "#### 2024"), ("Answer 5\n\n", "#### 5"),
    ("We get 48 / 2 = 24, so in total 48 + 24 = 72 clips.", "#### 72"), ("value -$4", "#### -4"),
    ("value $-4", "#### -4"), ("#### 3,000,000", "#### 3000000"), ("1e3", "#### 1000"), ("3/4", "#### 0.75"),
    ("a) 5 b) 6", "#### 6"), ("#### 5\nThe answer is 6", "#### 5"),
]


@pytest.fixture(scope="module")
def gsm8k_reference():
    "lm-eval's GSM8K filters and exact-match metric, built from its own task yaml."
    import yaml
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    class Loader(yaml.SafeLoader): pass
    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    task = yaml.load((LM_EVAL_DIR / "tasks/gsm8k/gsm8k.yaml").read_text(), Loader=Loader)
    filters = {f["name"]: f["filter"][0] for f in task["filter_list"]}
    metric = task["metric_list"][0]
    make = lambda f: RegexFilter(regex_pattern=f["regex_pattern"], group_select=f.get("group_select", 0))
    extract = {"strict": make(filters["strict-match"]), "flexible": make(filters["flexible-extract"])}

    def score(prediction, reference):
        return bool(exact_match_hf_evaluate([prediction], [reference], regexes_to_ignore=metric["regexes_to_ignore"],
                                            ignore_case=metric["ignore_case"],
                                            ignore_punctuation=metric["ignore_punctuation"])["exact_match"])
    return extract, score


def test_gsm8k_cases_are_many_and_distinct():
    assert len(set(GSM8K_CASES)) == len(GSM8K_CASES) >= 50


@pytest.mark.parametrize("mode", ["strict", "flexible"])
def test_gsm8k_agrees_with_lm_eval(gsm8k_reference, mode):
    extract, score = gsm8k_reference
    disagree = []
    for text, reference in GSM8K_CASES:
        theirs = extract[mode].apply([[text]], [None])[0][0]
        ours = extract_gsm8k(text, mode)
        if ours != theirs or gsm8k_correct(text, reference, mode) != score(theirs, reference):
            disagree.append((text, reference, ours, theirs))
    assert not disagree
    # the cases exercise both outcomes in both modes
    outcomes = {gsm8k_correct(t, r, mode) for t, r in GSM8K_CASES}
    assert outcomes == {True, False}


def test_gsm8k_constants_match_the_yaml():
    text = (LM_EVAL_DIR / "tasks/gsm8k/gsm8k.yaml").read_text()
    assert ev.GSM8K_STRICT.pattern.replace("\\", "\\\\") in text and ev.GSM8K_FLEXIBLE.pattern in text


# --- MATH: boxed extraction and normalisation against lm-eval's minerva_math utilities ----------------------------

def _module_from(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MINERVA_FUNCTIONS = {"last_boxed_only_string", "remove_boxed", "normalize_final_answer", "get_unnormalized_answer"}


@pytest.fixture(scope="module")
def minerva():
    """lm-eval's minerva_math utilities. The module refuses to import without math_verify and antlr4 4.11 (needed only
    for its sympy equivalence check), so when that import fails we run its own source of the four pure functions and
    their two tables, taken from the installed file with `ast`: still lm-eval's code, not ours."""
    path = LM_EVAL_DIR / "tasks/minerva_math/utils.py"
    if not path.is_file(): pytest.skip(f"lm-eval has no {path}: this version moved the minerva_math task")
    try:
        return vars(_module_from(path, "lm_eval_minerva_utils"))
    except (ImportError, AssertionError):
        tree = ast.parse(path.read_text())
        keep = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name in MINERVA_FUNCTIONS) or
                (isinstance(n, ast.Assign) and {getattr(t, "id", "") for t in n.targets} &
                 {"SUBSTITUTIONS", "REMOVED_EXPRESSIONS"})]
        namespace = {"re": re}
        exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), namespace)
        missing = MINERVA_FUNCTIONS - set(namespace)
        if missing: pytest.skip(f"lm-eval's minerva_math utils lack {missing}")
        return namespace


BOXED_CASES = [
    "so $x = \\boxed{6}$.", "\\boxed{\\frac{5}{6}}", "first \\boxed{1} then \\boxed{2}", "\\boxed{(7,3)}",
    "we get $\\boxed{[3,\\infty)}$", "\\boxed{5\\sqrt{2}}", "nested \\boxed{\\frac{\\sqrt{3}}{2}} end",
    "\\fbox{12}", "no box here", "\\boxed{unclosed", "\\boxed 7$ done", "$\\boxed 12$ and \\boxed{3}",
    "\\boxed{}", "\\boxed{x^{2}+1}", "text \\boxed{\\text{(A)}} text", "\\boxed{-2}.", "\\boxed{1,000}",
    "The answer is \\boxed{\\dfrac{3}{4}} I think", "\\boxed{a}\\boxed{b}", "\\fbox{1} and later \\boxed{2}",
]
ANSWER_CASES = [
    "6", "\\frac{5}{6}", "\\frac56", "\\dfrac{3}{4}", "x = 5", "k=5", "5 cm", "12 degrees", "10 dollars",
    "\\$10", "10\\%", "1,000", "1,000,000", "0,1", "(7,3)", "(7, 3)", "[3,\\infty)", "\\left( 3, \\infty \\right)",
    "5\\sqrt{2}", "5\\sqrt2", "\\sqrt[3]8", "\\sqrt[3]{8}", "\\text{(A)}", "\\textbf{7}", "\\overline{3}",
    "\\boxed{4}", "$4$", "x = $4$ units", "an apple", "a 5", "4.", "4.$", "3 \\text{ inches}", "90^\\circ",
    "90^{\\circ}", "2\\pi cm", "12 \\text{ ways}", "7 feet", "\\text{Tuesday}", "1\\text{ and }2", "x^2 + 1",
    "-\\frac{2}{3}", "\\frac{-2}{3}", "y = 2x + 3", "\\{1, 2\\}", "3\\;\\text{m}", "2,\\!000", "{,}5", "\"5\"",
    "1, 2, \\ldots, 9", "\\mbox{five}", "50 students", "3 edges", "the left side",
]
SENTENCE_CASES = [
    "Final Answer: The final answer is $6$. I hope it is correct.", "Final Answer: The final answer is 6.",
    "Final Answer: The final answer is \\frac{1}{2}. I hope it is correct.\nProblem: next",
    "The final answer is 6.", "Final Answer: The final answer is$7$. I hope it is correct.", "nothing",
]


def test_math_cases_are_many():
    assert len(BOXED_CASES) + len(ANSWER_CASES) + len(SENTENCE_CASES) >= 50 and len(ANSWER_CASES) >= 50


def _call(fn, *args):
    try: return fn(*args)
    except (AssertionError, EPnGError, TypeError): return "<error>"


def test_boxed_extraction_agrees_with_lm_eval(minerva):
    for text in BOXED_CASES:
        theirs, ours = minerva["last_boxed_only_string"](text), last_boxed(text)
        assert ours == theirs, text
        if theirs is not None:
            assert _call(strip_boxed, ours) == _call(minerva["remove_boxed"], theirs), text


def test_normalisation_agrees_with_lm_eval(minerva):
    disagree = [(a, normalize_math_answer(a), minerva["normalize_final_answer"](a)) for a in ANSWER_CASES
                if normalize_math_answer(a) != minerva["normalize_final_answer"](a)]
    assert not disagree


def test_final_answer_sentence_agrees_with_lm_eval(minerva):
    for text in SENTENCE_CASES:
        assert final_answer_sentence(text) == minerva["get_unnormalized_answer"](text), text


def test_gold_answers_agree_with_lm_eval_process_docs(minerva):
    "minerva's process_docs: normalize_final_answer(remove_boxed(last_boxed_only_string(solution)))."
    for row in load_eval_rows("math", "embedded"):
        theirs = minerva["normalize_final_answer"](minerva["remove_boxed"](minerva["last_boxed_only_string"](row["solution"])))
        assert math_gold(row["solution"]) == theirs


def test_math_scoring():
    solution = "so $x = \\boxed{\\frac{1}{2}}$."
    assert math_correct("The answer is: 0.5", solution) and math_correct("\\boxed{\\dfrac12}", solution)
    assert math_correct("Final Answer: The final answer is $1/2$. I hope it is correct.", solution)
    assert not math_correct("The answer is: 0.6", solution) and not math_correct("I am not sure.", solution)
    assert extract_math_answer("I am not sure.") == INVALID_MATH
    with pytest.raises(EPnGError, match="no \\\\boxed"):
        math_gold("no boxed answer")


# --- loaders ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(EVAL_SETS))
def test_shipped_samples_have_the_real_schema(kind):
    rows = load_eval_rows(kind, "embedded")
    assert len(rows) >= (164 if kind == "humaneval" else 6)
    assert all(set(EVAL_SETS[kind].required) <= set(r) for r in rows)


def test_local_files_and_missing_fields(tmp_path):
    rows = load_eval_rows("gsm8k", "embedded")
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "g.json").write_text(json.dumps(rows))
    assert load_eval_rows("gsm8k", tmp_path / "g.jsonl") == rows == load_eval_rows("gsm8k", str(tmp_path / "g.json"))
    assert len(load_eval_rows("gsm8k", tmp_path / "g.jsonl", limit=4)) == 4
    with pytest.raises(EPnGError, match=r"row 1 lacks the field\(s\) \['answer'\].*openai/gsm8k"):
        load_eval_rows("gsm8k", [rows[0], {"question": "q"}])
    with pytest.raises(EPnGError, match=r"\['canonical_solution', 'test', 'entry_point'\]"):
        load_eval_rows("humaneval", [{"task_id": "t", "prompt": "p"}])
    with pytest.raises(EPnGError, match="no rows"):
        load_eval_rows("math", [])
    with pytest.raises(EPnGError, match="no file"):
        load_eval_rows("mbpp", tmp_path / "missing.jsonl")


# --- pass@k ----------------------------------------------------------------------------------------------------

def test_pass_at_k_equals_the_binomial_form():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert abs(pass_at_k(n, c, k) - exact) < 1e-12


def test_pass_at_k_bad_input():
    with pytest.raises(EPnGError, match="at least 10 samples"):
        pass_at_k(5, 2, 10)
    with pytest.raises(EPnGError, match="impossible"):
        pass_at_k(5, 6, 1)
    with pytest.raises(EPnGError, match="k >= 1"):
        pass_at_k(5, 1, 0)


def test_evaluate_math_and_gsm8k_on_recorded_generations(monkeypatch):
    gsm = load_eval_rows("gsm8k", "embedded")[:3]
    monkeypatch.setattr(ev, "generate", lambda *a, **k: ["The answer is: 64", "#### 405", "no idea"])
    result = evaluate_gsm8k(None, byte_tokenizer(), gsm, progress=False)
    assert [r["correct"] for r in result.records] == [True, True, False] and result.score == pytest.approx(2 / 3)
    rows = load_eval_rows("math", "embedded")[:2]
    monkeypatch.setattr(ev, "generate", lambda *a, **k: ["\\boxed{6}", "The answer is: 5/6"])
    assert evaluate_math(None, byte_tokenizer(), rows, progress=False).score == 1.0


# --- generation --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded():
    from epng.train import load_model_and_tokenizer
    return load_model_and_tokenizer("embedded")


def test_generate_on_attached_merged_and_plain_models(embedded):
    model, tok = embedded
    prompts = ["Question: 3 + 4?\nAnswer:", "ab", "Mixture of experts"]
    plain = generate(model, tok, prompts, max_new_tokens=8, batch_size=2, progress=False)
    handle = epng.attach(model)
    torch.manual_seed(3)
    for lora in handle.loras:
        for B in lora.B.values(): B.data.normal_(0, 0.3)
    adapted = generate(model, tok, prompts, max_new_tokens=8, batch_size=3, progress=False)
    merged = generate(handle.merged_model(), tok, prompts, max_new_tokens=8, batch_size=1, progress=False)
    assert adapted == merged and adapted != plain
    assert all(isinstance(t, str) for t in plain) and len(plain) == 3
    samples = generate(model, tok, prompts[:1], max_new_tokens=4, do_sample=True, num_return_sequences=2,
                       progress=False)
    assert len(samples) == 1 and len(samples[0]) == 2


def test_generate_bad_input(embedded):
    model, tok = embedded
    with pytest.raises(EPnGError, match="empty list of prompts"):
        generate(model, tok, [])
    with pytest.raises(EPnGError, match="one string"):
        generate(model, tok, "hello")
    with pytest.raises(EPnGError, match="do_sample=True"):
        generate(model, tok, ["a"], num_return_sequences=2)


# --- ARC / BoolQ through lm-eval ---------------------------------------------------------------------------------

def _direct_loglikelihood(model, tok, context: str, continuation: str) -> float:
    ctx = tok(context)["input_ids"]  # the tokenizer's own convention (here: a BOS first), as lm-eval's HFLM does
    cont = tok(context + continuation)["input_ids"][len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_lm_eval_runs_our_model_on_local_tasks(embedded, tmp_path):
    "The real simple_evaluate path, on local copies in the ARC/BoolQ schema; its loglikelihoods equal ours."
    model, tok = embedded
    names = ev.local_task_configs(tmp_path, arc="embedded", boolq="embedded")
    out = ev.evaluate_general(model, tok, tasks=names, include_path=tmp_path, batch_size=8, limit=3,
                              log_samples=True)
    arc = out["raw"]["samples"]["epng_arc_local"]
    assert len(arc) == 3 and set(out["scores"]) == set(names)
    correct = []
    for sample in arc:
        context = sample["arguments"][0][0]
        ours = [_direct_loglikelihood(model, tok, context, " " + choice) for choice in sample["doc"]["choices"]["text"]]
        theirs = [ll for ll, _ in sample["filtered_resps"]]
        assert ours == pytest.approx(theirs, abs=1e-3)
        correct.append(int(max(range(len(ours)), key=ours.__getitem__) == sample["target"]))
    assert out["scores"]["epng_arc_local"]["acc"] == pytest.approx(sum(correct) / 3)


def test_local_task_configs_check_fields(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(EPnGError, match="answerKey"):
        ev.local_task_configs(tmp_path, arc=tmp_path / "bad.jsonl")


# --- judging -----------------------------------------------------------------------------------------------------

RECORDED = {  # replies written by the project in the shapes judges give
    "tag_a": "Response A keeps to the vegetarian preference, B ignores it.\n\n[[A]]",
    "tag_b": "B is better. [[B]]",
    "tag_c": "Both responses are equally good. [[C]]",
    "tag_tie": "They are equivalent: [[tie]]",
    "line": "Explanation: A recommends meat.\nFinal verdict: B",
    "bold": "**Verdict: Response A**",
    "none": "I would prefer not to choose.",
    "both": "At first [[A]], but on reflection [[B]].",
}


def test_parse_verdict_on_recorded_replies():
    expected = {"tag_a": "A", "tag_b": "B", "tag_c": "tie", "tag_tie": "tie", "line": "B", "bold": "A"}
    assert {k: parse_verdict(RECORDED[k]) for k in expected} == expected
    with pytest.raises(VerdictError, match="no verdict"):
        parse_verdict(RECORDED["none"])
    with pytest.raises(VerdictError, match="several verdicts"):
        parse_verdict(RECORDED["both"])


def test_prompt_and_position_swap():
    messages = pairwise_judge_prompt("Plan a dinner.", "Lentil soup.", "Beef stew.", preference="I am vegetarian.")
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert user.index("I am vegetarian.") < user.index("Plan a dinner.") < user.index("Lentil soup.") < user.index("Beef stew.")
    assert "[[A]]" in messages[0]["content"] and "[[C]]" in messages[0]["content"]
    seen = []

    def judge(replies):
        def call(messages):
            seen.append(messages[1]["content"]); return replies.pop(0)
        return call
    # consistent in both orders → a winner; position-biased (always "A") → a tie
    assert judge_pair(judge([RECORDED["tag_a"], RECORDED["tag_b"]]), "Plan a dinner.", "Lentil soup.", "Beef stew.")["verdict"] == "A"
    assert seen[1].index("Beef stew.") < seen[1].index("Lentil soup.")
    assert judge_pair(judge([RECORDED["tag_a"], RECORDED["tag_a"]]), "q", "x", "y")["verdict"] == "tie"
    items = [dict(question="q", a="x", b="y")] * 2
    rate = pairwise_win_rate(judge([RECORDED["tag_a"], RECORDED["tag_b"], RECORDED["tag_c"], RECORDED["tag_c"]]), items,
                             progress=False)
    assert (rate["win"], rate["loss"], rate["tie"], rate["win_rate"]) == (1, 0, 1, 0.75)


def test_judge_without_a_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(EPnGError, match="OPENAI_API_KEY"):
        OpenAIJudge()


def test_openai_judge_request_on_a_recorded_response(monkeypatch):
    "The urllib path: request shape and reply parsing, against a recorded response (urlopen replaced: no network)."
    import io
    import urllib.request
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-real")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://judge.invalid/v1/")
    sent = {}

    def fake_urlopen(request, timeout):
        sent.update(url=request.full_url, auth=request.get_header("Authorization"), body=json.loads(request.data))
        reply = {"id": "rec-1", "object": "chat.completion", "choices": [{"index": 0, "message": {
            "role": "assistant", "content": RECORDED["tag_b"]}, "finish_reason": "stop"}]}
        return io.BytesIO(json.dumps(reply).encode())
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    judge = OpenAIJudge(model="judge-model")
    text = judge._post(pairwise_judge_prompt("q", "x", "y"))
    assert parse_verdict(text) == "B"
    assert sent["url"] == "http://judge.invalid/v1/chat/completions" and sent["auth"] == "Bearer sk-test-not-real"
    assert sent["body"]["model"] == "judge-model" and sent["body"]["temperature"] == 0.0
    assert sent["body"]["messages"][0]["role"] == "system"
