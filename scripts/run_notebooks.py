#!/usr/bin/env python
"""Run the notebooks in nbs/ top to bottom and store their outputs, so a reader on GitHub sees figures and results.

    python scripts/run_notebooks.py                      # every notebook, two at a time
    python scripts/run_notebooks.py --only 14a_sandbox 19_workshop --n_workers 1

Each notebook runs in its own process and execnb kernel, in nbs/ (as nbdev_test runs it), offline, one thread, no
progress bars, with small PNG figures. Cells nbdev_test skips (`#| eval: false`, the `tst_flags` of settings.ini, the
`nbdev_export()` cell) are skipped here too and keep no output. Outputs keep what a reader needs: live widgets (an id
that changes every run), terminal codes and progress bars go, and this machine's paths read `/tmp/...`,
`site-packages/...`. A notebook that fails is left as it was and the script exits with 1. Temporary files go to a
scratch folder that is deleted afterwards; at the end `nbdev_clean` makes the result stable, and the script fails if a
run left a new file under nbs/.
"""
import argparse, os, re, site, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
DPI = 72  # inline figures: 6x4 inches -> 432x288 px; keeps each notebook small
QUIET = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
         "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # and TMPDIR, MPLCONFIGDIR, hypothesis: a scratch folder
         "DS_ACCELERATOR": "cpu"}   # DeepSpeed, where installed, otherwise prints to stdout that it found no GPU


def skipped_by_nbdev_test(cell, flags: set) -> bool:
    "The rule of `nbdev.test.test_nb`: only code cells run, never the export cell, `eval: false` or a `tst_flags` flag."
    from nbdev.process import extract_directives
    if cell.cell_type != "code": return True
    if "nbdev_export" + "(" in cell.source: return True
    direc = extract_directives(cell, remove=False)
    if direc.get("eval:", [""])[0].lower() == "false": return True
    return bool(flags & direc.keys())


def run_one(path: Path) -> None:
    "Execute `path` in a fresh kernel and write it back with its outputs; raise (writing nothing) if a cell fails."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from fastcore.basics import str2bool
    from nbdev.config import get_config
    from nbdev.frontmatter import FrontmatterProc
    from nbdev.process import NBProcessor
    fm = getattr(NBProcessor(path, procs=FrontmatterProc, process=True).nb, "frontmatter_", {})
    if str2bool(fm.get("skip_exec", False)): return
    flags = set(get_config().tst_flags.split())
    nb = read_nb(path)
    for cell in nb.cells:                                  # a cell that now prints nothing must not keep old output
        if cell.cell_type == "code": cell.outputs, cell.execution_count = [], None
    sys.path.insert(0, str(ROOT))
    shell = CaptureShell(path, mpl_format="png")
    run = shell._run   # execnb drops all of a cell's prints when it ends with `;`; Jupyter only hides its last value
    shell._run = lambda raw, *a, **k: run(raw.rstrip() + "\npass" if raw.rstrip().endswith(";") else raw, *a, **k)
    shell.run_cell(f"%config InlineBackend.print_figure_kwargs = {{'bbox_inches': 'tight', 'dpi': {DPI}}}")
    try: shell.run_all(nb, exc_stop=True, preproc=lambda c: skipped_by_nbdev_test(c, flags), postproc=tidy)
    except Exception: sys.exit(shell.prettytb(fname=path))
    write_nb(nb, path)


WIDGET = "application/vnd.jupyter.widget-view+json"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
BAR = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")  # a tqdm bar that ignored TQDM_DISABLE (passed disable=False)


def neutral(text: str) -> str:
    "Paths of this machine out of an output: the run's scratch folder reads /tmp, installed packages site-packages."
    for d in sorted(set(site.getsitepackages() + [site.getusersitepackages()]), key=len, reverse=True):
        text = text.replace(d, "site-packages")
    return text.replace(os.environ["TMPDIR"], "/tmp").replace(str(ROOT) + os.sep, "").replace(str(Path.home()), "~")


def terminal(text: str) -> str:
    "What a terminal would show of a stream: the last rewrite of each line, no colour codes, no progress bars."
    keep = []
    for line in text.split("\n"):
        shown = ANSI.sub("", line).split("\r")[-1]
        if BAR.search(shown) or (line and not shown): continue
        keep.append(shown)
    return "\n".join(keep)


def tidy(cell) -> None:
    "What a saved notebook cannot show goes: a live widget (a fresh id each run; the figure it drew stays), terminal codes."
    cell.outputs = [o for o in cell.outputs if WIDGET not in o.get("data", {})]
    for o in cell.outputs:
        if o["output_type"] == "stream": o["text"] = terminal(neutral("".join(o["text"]))).splitlines(True)
        for k, v in o.get("data", {}).items():
            if k.startswith("text/"): o["data"][k] = neutral("".join(v)).splitlines(True)
    cell.outputs = [o for o in cell.outputs if o["output_type"] != "stream" or o["text"]]


def run_in_child(path: Path, timeout: float) -> tuple[Path, bool, float, str]:
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="epng-nb-") as scratch:
        env = {**os.environ, **QUIET, "TMPDIR": scratch, "MPLCONFIGDIR": scratch,
               "HYPOTHESIS_STORAGE_DIRECTORY": scratch}
        try:
            p = subprocess.run([sys.executable, __file__, "--child", str(path)], cwd=path.parent, env=env,
                               capture_output=True, text=True, timeout=timeout)
            ok, log = p.returncode == 0, p.stdout + p.stderr
        except subprocess.TimeoutExpired: ok, log = False, f"timed out after {timeout:.0f} s"
    return path, ok, time.time() - start, log


def untracked() -> set:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored", "--", "nbs"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {l[3:] for l in out.splitlines() if l[:2] in ("??", "!!")}


def find(names) -> list:
    if not names: return sorted(NBS.glob("*.ipynb"))
    found = []
    for n in names:
        p = NBS / (Path(n).stem + ".ipynb")
        if not p.exists(): sys.exit(f"{p} does not exist: give a notebook name from nbs/, e.g. 14a_sandbox.")
        found.append(p)
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="notebooks to run (name with or without .ipynb)")
    ap.add_argument("--n_workers", type=int, default=2, help="notebooks run side by side (default 2)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one notebook may take (default 1800)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child: return run_one(a.child.resolve())
    paths, before = find(a.only), untracked()
    failed = []
    with ThreadPoolExecutor(max(1, a.n_workers)) as pool:
        for path, ok, secs, log in pool.map(lambda p: run_in_child(p, a.timeout), paths):
            print(f"{'ok    ' if ok else 'FAILED'} {path.name} ({secs:.0f} s)", flush=True)
            if not ok: failed.append(path.name); print(log[-6000:], file=sys.stderr)
    subprocess.run(["nbdev_clean"], cwd=ROOT, check=True)
    if new := untracked() - before:
        sys.exit(f"the runs left files under nbs/ (remove them; a notebook should write to a temporary folder): "
                 f"{sorted(new)}")
    if failed: sys.exit(f"failed, left unchanged: {' '.join(failed)}")
    sizes = sorted(((p.stat().st_size, p.name) for p in paths), reverse=True)
    print("largest: " + ", ".join(f"{n} {s / 1e6:.2f} MB" for s, n in sizes[:3]))


if __name__ == "__main__": main()
