"""Write README.md from nbs/index.ipynb (nbdev_readme needs quarto, which is not installed here).

Markdown cells are copied as they are, code cells become ```python blocks; cells marked `#| hide` are left out.
`python scripts/readme.py --check` exits 1 when README.md is not what the notebook gives."""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTE = "<!-- Generated from nbs/index.ipynb by scripts/readme.py: edit the notebook, then run the script. -->"

def cell_text(cell: dict) -> str | None:
    source = "".join(cell["source"]).strip("\n")
    if cell["cell_type"] == "markdown": return source
    lines = source.splitlines()
    if any(line.strip() == "#| hide" for line in lines): return None
    code = "\n".join(line for line in lines if not line.startswith("#|")).strip("\n")
    return f"```python\n{code}\n```" if code else None

def readme() -> str:
    cells = json.loads((ROOT / "nbs" / "index.ipynb").read_text(encoding="utf-8"))["cells"]
    return "\n\n".join([NOTE, *filter(None, map(cell_text, cells))]) + "\n"

if __name__ == "__main__":
    target = ROOT / "README.md"
    if "--check" in sys.argv:
        if target.read_text(encoding="utf-8") != readme():
            sys.exit("README.md is out of step with nbs/index.ipynb: run `python scripts/readme.py` and commit it.")
    else: target.write_text(readme(), encoding="utf-8")
