"""What `pip install` gives a user (issue 14): the sdist's files and metadata, the transformers floor, `epng.__all__`,
and notebooks that run with the `notebooks` extra and leave the library alone outside a development checkout.
Installing the built sdist and wheel into fresh venvs is scripts/test_package.sh; the lowest transformers, scripts/test_lowest.sh."""
import ast, email, importlib, json, os, re, subprocess, sys, tarfile
from configparser import ConfigParser
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import epng

ROOT = Path(__file__).resolve().parent.parent
# The agreed last cell of every notebook that exports code: nbdev_test skips it (it contains "nbdev_export(").
EXPORT_CELL = ('#| hide\n'
               '# in a development checkout (settings.ini one folder up, nbdev installed) this regenerates epng/; elsewhere it does nothing\n'
               'import importlib.util, pathlib\n'
               'if pathlib.Path("../settings.ini").exists() and importlib.util.find_spec("nbdev"): import nbdev; nbdev.nbdev_export()')
OLD_EXPORT_CELL = '#| hide\nimport nbdev; nbdev.nbdev_export()'
# Notebooks other helpers were editing while the export cell changed; the lead gives them EXPORT_CELL, then empties this.
PENDING = set()


def settings() -> dict:
    config = ConfigParser(delimiters=["="])
    config.read(ROOT / "settings.ini", encoding="utf-8")
    return config["DEFAULT"]


def notebooks() -> list[Path]:
    return sorted((ROOT / "nbs").glob("*.ipynb"))


def code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    "The sdist `python -m build` makes (without build isolation: a second, not a download): its file names and PKG-INFO."
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True)
    [archive] = out.glob("epng-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        info = tar.extractfile(f"{archive.name[:-len('.tar.gz')]}/PKG-INFO").read().decode()
    return names, email.message_from_string(info)


def test_sdist_carries_what_setup_and_the_package_read(sdist):
    names, _ = sdist
    # setup.py reads settings.ini and README.md; epng loads the fixtures and the nano model at run time
    for needed in ["settings.ini", "README.md", "LICENSE", "setup.py", "epng/nano_model/model.safetensors",
                   "epng/nano_model/tokenizer.json", "epng/nano_dense/model.safetensors",
                   "epng/fixtures/metamathqa_sample.jsonl"]:
        assert needed in names, f"the sdist lacks {needed}: add it to MANIFEST.in"
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert settings()["license"] == "apache2"


def test_classifier_says_the_status_settings_ini_gives(sdist):
    _, info = sdist
    names = {1: "Planning", 2: "Pre-Alpha", 3: "Alpha", 4: "Beta", 5: "Production/Stable"}
    status = int(settings()["status"])
    [development] = [c for c in info.get_all("Classifier") if c.startswith("Development Status ::")]
    assert development == f"Development Status :: {status} - {names[status]}"


def requirements(info, extra: str | None) -> list[Requirement]:
    "The Requires-Dist of PKG-INFO: the base ones (extra None) or those of one extra."
    reqs = [Requirement(r) for r in info.get_all("Requires-Dist")]
    if extra is None: return [r for r in reqs if r.marker is None]
    return [r for r in reqs if r.marker is not None and r.marker.evaluate({"extra": extra})]


def test_declared_transformers_floor_is_the_one_import_checks(sdist):
    _, info = sdist
    [transformers] = [r for r in requirements(info, None) if r.name == "transformers"]
    assert str(transformers.specifier) == f">={epng.MIN_TRANSFORMERS}"
    assert "build" in {r.name for r in requirements(info, "dev")}   # scripts/test_package.sh builds with it


def test_import_below_the_floor_names_the_version():
    # the installed transformers reported as 5.6.2, the last release whose experts lack what epng reads
    code = ("import importlib.metadata as m\n"
            "real = m.version\n"
            "m.version = lambda name: '5.6.2' if name == 'transformers' else real(name)\n"
            "import epng\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: epng needs transformers >= 5.7.0; 5.6.2 is installed"), result.stderr[-2000:]
    assert 'pip install -U "transformers>=5.7.0"' in last


def test_all_lists_every_public_name():
    lazy = {name: module for module, names in epng._SOURCES.items() for name in names.split()}   # imported on first use
    assert len(lazy) > 30 and set(lazy) <= set(epng.__all__), sorted(set(lazy) - set(epng.__all__))
    for name, module in lazy.items():  # each name is defined where the table says it is
        assert hasattr(importlib.import_module(f"epng.{module}"), name), (name, module)
    assert {"MIN_TRANSFORMERS", "check_transformers"} <= set(epng.__all__)
    star = {}
    exec("from epng import *", star)
    assert {"attach", "EPnGConfig", "train", "TrainArgs", "EPnGCallback"} <= star.keys()


def runtime_imports(source: str) -> set[str]:
    "Top-level module names a cell imports when it runs; an import guarded by `try/except ImportError` is optional."
    found = set()
    def visit(node, optional=False):
        if isinstance(node, ast.Try):
            caught = {getattr(h.type, "id", None) for h in node.handlers}
            optional = optional or bool(caught & {None, "ImportError", "ModuleNotFoundError", "Exception"})
        if isinstance(node, ast.Import) and not optional:
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and not optional:
            found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node): visit(child, optional)
    visit(ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))))
    return found


def provided(info, extra: str) -> set[str]:
    "The distributions epng's base requirements and `extra` install, with what they require in turn (as installed here)."
    seen, todo = set(), [(Requirement(r), extra) for r in info.get_all("Requires-Dist")]
    while todo:
        req, parent_extra = todo.pop()
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate({"extra": parent_extra}): continue
        if name in seen: continue
        seen.add(name)
        try: requires = metadata.distribution(req.name).requires or []
        except metadata.PackageNotFoundError: continue
        for extra in ["", *req.extras]: todo += [(Requirement(r), extra) for r in requires]
    return seen


def test_notebooks_import_only_what_the_notebooks_extra_installs(sdist):
    _, info = sdist
    have = provided(info, "notebooks")
    assert {"jupyterlab", "ipykernel", "fastcore"} <= have
    owners = metadata.packages_distributions()
    missing = {}
    for path in notebooks():
        for cell in code_cells(path):
            if cell == EXPORT_CELL or (path.stem in PENDING and cell == OLD_EXPORT_CELL): continue
            for module in runtime_imports(cell) - set(sys.stdlib_module_names) - {"epng"}:
                dists = {canonicalize_name(d) for d in owners.get(module, [])}
                assert dists, f"{path.name} imports {module}, which is not installed here"
                if not dists & have: missing.setdefault(module, set()).add(path.name)
    assert not missing, f"notebooks import what `pip install epng[notebooks]` does not install: {missing}"


def test_runtime_imports_sees_guards():
    assert runtime_imports("import torch\nfrom fastcore.test import test_eq\ndef f():\n    import lm_eval") == \
        {"torch", "fastcore", "lm_eval"}
    assert runtime_imports("try:\n    import openai\nexcept ImportError:\n    openai = None") == set()


def test_every_exporting_notebook_ends_with_the_agreed_cell():
    exporting = [p for p in notebooks() if any("#| default_exp" in c for c in code_cells(p))]
    assert len(exporting) >= 18
    for path in exporting:
        cells = code_cells(path)
        expected = OLD_EXPORT_CELL if path.stem in PENDING else EXPORT_CELL
        assert cells[-1] == expected, f"{path.name} does not end with the agreed export cell"
        assert not [c for c in cells[:-1] if "nbdev_export" in c], f"{path.name} exports before its last cell"
    for path in set(notebooks()) - set(exporting):
        assert not [c for c in code_cells(path) if "nbdev_export" in c], path.name


@pytest.mark.parametrize("checkout, nbdev_installed, exports", [
    (True, True, True), (False, True, False), (True, False, False)])
def test_export_cell_exports_only_in_a_development_checkout(tmp_path, checkout, nbdev_installed, exports):
    # run the cell's code in a notebook folder with or without ../settings.ini, against a stand-in nbdev module
    (tmp_path / "nbs").mkdir()
    if checkout: (tmp_path / "settings.ini").write_text("[DEFAULT]\n")
    if nbdev_installed:
        (tmp_path / "fake").mkdir()
        (tmp_path / "fake" / "nbdev.py").write_text("def nbdev_export(): open('exported', 'w').close()\n")
    code = "\n".join(line for line in EXPORT_CELL.splitlines() if not line.startswith("#|"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    # the installed packages (the real nbdev among them) hidden: only the stand-in, if any, can be found
    runner = f"import sys; sys.path[:] = [p for p in sys.path if '-packages' not in p]; exec({code!r})"
    subprocess.run([sys.executable, "-c", runner], cwd=tmp_path / "nbs", env=env, check=True)
    assert (tmp_path / "nbs" / "exported").exists() == exports


def test_readme_gives_cpu_and_gpu_installs_and_how_to_open_the_notebooks():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    cpu = [line for line in readme.splitlines() if "download.pytorch.org/whl/cpu" in line]
    assert cpu and re.search(r"pip install torch --index-url \S+/whl/cpu && pip install \S*epng", cpu[0]), cpu
    assert re.search(r"^pip install torch \"epng", readme, re.M)
    assert 'pip install -e ".[notebooks]"' in readme and "jupyter lab nbs" in readme
    assert "colab.research.google.com/github/epng/epng/blob/main/nbs/" in readme


def test_each_notebook_imports_only_earlier_ones():
    "The learning order: a notebook (its exported code and its demos) uses modules of notebooks before it, never after."
    nbs = sorted((ROOT / "nbs").glob("[0-9]*.ipynb"))
    home = {}                                                        # module -> the notebook that exports it
    for i, p in enumerate(nbs):
        for cell in json.loads(p.read_text())["cells"]:
            if m := re.match(r"#\|\s*default_exp\s+(\S+)", "".join(cell["source"])): home[m[1]] = i
    later = []
    for i, p in enumerate(nbs):
        for cell in json.loads(p.read_text())["cells"]:
            if cell["cell_type"] != "code": continue
            for mod in re.findall(r"(?:from|import)\s+epng\.(\w+)", "".join(cell["source"])):
                if home.get(mod, -1) > i: later.append(f"{p.stem} imports epng.{mod} ({nbs[home[mod]].stem})")
    assert len(home) > 20 and not later, later
