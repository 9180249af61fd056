#!/usr/bin/env bash
# Every test of the project: install, check that the exported library and the notebooks are clean,
# run the notebooks (nbdev_test) and the pytest suites. CI (.ci/run) calls this same script.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
# two notebooks run side by side on two cores: one thread each avoids oversubscription (3-10x slower otherwise)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# the tests run on CPUs; DeepSpeed (a dev requirement) otherwise prints to stdout that it found no GPU
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}

python -m pip install --quiet --disable-pip-version-check torch==2.13.0 -e ".[dev]"
# generated code runs only in a bubblewrap sandbox (nbs/14a_sandbox.ipynb): install it where it is missing
if ! command -v bwrap >/dev/null; then
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq bubblewrap
    else echo "bwrap is missing: install the Debian/Ubuntu package bubblewrap (sudo apt-get install bubblewrap)." >&2; exit 1; fi
fi

state() { git status --porcelain -- nbs epng; git diff -- nbs epng; }
before=$(state)
nbdev_export
nbdev_clean
if [ "$(state)" != "$before" ]; then
    echo "nbdev_export or nbdev_clean changed files under nbs/ or epng/: run both and commit the result." >&2
    git status --short -- nbs epng >&2
    exit 1
fi

python scripts/readme.py --check
nbdev_test --n_workers 2 --timing
python -m pytest tests -q
# what a user installs: the sdist and the wheel, each in a fresh venv, train from outside the checkout (~2 min)
bash scripts/test_package.sh
# the second environment: the fast tests on the lowest transformers settings.ini allows (~1 min)
bash scripts/test_lowest.sh
