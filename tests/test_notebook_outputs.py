"""The notebooks are committed with their outputs (scripts/run_notebooks.py writes them): figures show in a notebook
kernel, also after `train()`, and no teaching cell that should show a result is blank."""
import ast, base64, json, os, re, subprocess, sys, textwrap
from pathlib import Path
import pytest
from execnb.nbio import read_nb
from IPython.core.inputtransformer2 import TransformerManager
from nbdev.config import get_config
from nbdev.process import extract_directives

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from run_notebooks import skipped_by_nbdev_test  # the cells the script does not run keep no output

# The reproduction notebooks (18, 18a-18d) are not lessons: their results are the paper's tables on a GPU with the hub's
# models, and what a CPU commits is a smoke run of the same cells, where cells meant for the full mode may print
# nothing. They are still run and committed with those smoke outputs; only the lessons must show every result.
REPRODUCTIONS = re.compile(r"^18[a-d]?_")
TEACHING = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not REPRODUCTIONS.match(p.name))
SKIP_FLAGS = set(get_config(path=ROOT).tst_flags.split())
SHOWS = {"print", "display"}
PLOTS = re.compile(r"^(plot\w*|show|imshow|matshow|hist|bar|barh|scatter|subplots|heatmap)$")
SILENT = re.compile(r"^(test\w*|assert\w*|close|savefig)$")  # fastcore.test helpers, pyplot's close and savefig: None


def _name(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _calls(stmt) -> list:
    "Names of the calls `stmt` makes when it runs, not those inside functions or classes it defines."
    found, todo = [], [stmt]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)): continue
        if isinstance(node, ast.Call): found.append(_name(node))
        todo.extend(ast.iter_child_nodes(node))
    return found


def _top_level(body) -> list:
    "The cell's statements, with the bodies of loops and `with` blocks (they always run), not of `if`/`try`."
    out = []
    for s in body:
        if isinstance(s, (ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith)):
            out.extend(_top_level(s.body))
            out.append(s.iter if isinstance(s, (ast.For, ast.AsyncFor)) else s.test if isinstance(s, ast.While)
                       else ast.Tuple([i.context_expr for i in s.items]))
        elif isinstance(s, ast.If): out.append(s.test)
        elif not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Try)): out.append(s)
    return out


def should_show(source: str) -> bool:
    "Does a cell with this source show something when it runs: a result, a print, a display or a figure?"
    tree = ast.parse(TransformerManager().transform_cell(source))
    if not tree.body: return False
    last = tree.body[-1]
    if isinstance(last, ast.Expr) and not source.rstrip().endswith(";") and not (
            isinstance(last.value, ast.Call) and SILENT.match(_name(last.value))): return True
    calls = [c for s in _top_level(tree.body) for c in _calls(s)]
    if SHOWS & set(calls): return True
    return any(PLOTS.match(c) for c in calls) and "close" not in calls


def test_should_show():
    "The rule on cells a reader meets."
    assert should_show("x = 1\nx")
    assert should_show("print('hi')\ny = 2")
    assert should_show("for k in range(3): print(k)")
    assert should_show("fig, ax = plt.subplots()\nax.plot([1, 2]);")
    assert should_show("fig = plot_cycle_history(history, 8)")
    assert should_show("%time sum(range(3))")
    assert not should_show("x = 1")
    assert not should_show("x;")
    assert not should_show("import torch\nfrom epng import *")
    assert not should_show("test_eq(1, 1)\ntest_fail(lambda: 1 / 0, contains='division')")
    assert not should_show("def f(x):\n    print(x)\n    return x")
    assert not should_show("if verbose: print('done')")
    assert not should_show("fig = plot_losses(losses)\nfig.savefig(p); plt.close(fig)")


@pytest.mark.parametrize("path", TEACHING, ids=lambda p: p.stem)
def test_teaching_cells_show_their_results(path):
    "Every code cell of a lesson that should show something was committed with its output (scripts/run_notebooks.py)."
    blank = []
    for i, cell in enumerate(read_nb(path).cells):
        if skipped_by_nbdev_test(cell, SKIP_FLAGS): continue
        if {"hide", "export", "exports", "exporti"} & extract_directives(cell, remove=False).keys(): continue
        if should_show(cell.source) and not cell.get("outputs"):
            blank.append(f"cell {i}: {cell.source.splitlines()[0]}")
    assert not blank, (f"{path.name} has cells that show nothing; run `python scripts/run_notebooks.py --only "
                       f"{path.stem}` and commit the outputs:\n" + "\n".join(blank))


def _png_width(b64: str) -> int: return int.from_bytes(base64.b64decode(b64)[16:20], "big")


@pytest.mark.parametrize("path", sorted((ROOT / "nbs").glob("*.ipynb")), ids=lambda p: p.stem)
def test_outputs_stay_small(path):
    "Figures are bounded PNGs (72 dpi) and a notebook stays a page a browser opens at once."
    assert path.stat().st_size < 1_500_000, f"{path.name} is {path.stat().st_size / 1e6:.1f} MB"
    for cell in json.loads(path.read_text())["cells"]:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            assert not {"image/jpeg", "image/svg+xml", "application/vnd.jupyter.widget-view+json"} & data.keys(), \
                f"{path.name}: outputs are PNG figures and no live widgets (run scripts/run_notebooks.py)"
            if "image/png" in data and (w := _png_width("".join(data["image/png"]))) > 1000:
                pytest.fail(f"{path.name}: a figure {w} px wide; give it a smaller figsize (drawn at 72 dpi)")


KERNEL = textwrap.dedent("""
    import json, sys
    from execnb.shell import CaptureShell
    shell = CaptureShell(mpl_format="png")
    cells = ["import epng, matplotlib.pyplot as plt",
             f"run = epng.train(epng.TrainArgs(max_steps=2, limit=16, batch_size=4, output_dir={sys.argv[1]!r}))",
             "fig, ax = plt.subplots(figsize=(2, 2))\\nax.plot([0, 1], [1, 0]);"]
    outs = []
    for code in cells:
        res = shell.run(code)
        assert shell.exc is None, shell.exc
        outs.append([sorted(o.get("data", {})) for o in res])
    print(json.dumps(outs))
""")


def test_figure_after_train_shows_inline(tmp_path):
    "train() saves its figures without switching pyplot's backend: a figure drawn next in a notebook is displayed."
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", KERNEL, str(tmp_path / "run")], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    _, trained, drawn = json.loads(done.stdout.splitlines()[-1])
    assert (tmp_path / "run" / "figures" / "loss.png").exists()          # train drew its own figures to files ...
    assert not any("image/png" in o for o in trained)                    # ... and closed them: none pops up
    assert any("image/png" in o for o in drawn), drawn
