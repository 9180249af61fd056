#!/usr/bin/env bash
# What a user gets from `pip install`: build the sdist and the wheel, install each into its own fresh virtual
# environment (torch first, as the README says, then the package with its declared dependencies), and train 5 steps
# with the installed `epng` command from a folder outside the repository. scripts/test.sh calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }
for dist in "$work"/dist/epng-*.tar.gz "$work"/dist/epng-*.whl; do
    name=$(basename "$dist")
    python -m venv "$work/venv"
    "$work/venv/bin/pip" install --quiet --quiet --no-compile torch==2.13.0
    cuda() { "$work/venv/bin/pip" list 2>/dev/null | grep -i '^nvidia-' || true; }
    before=$(cuda)
    "$work/venv/bin/pip" install --quiet --quiet --no-compile "$dist"
    # with torch already there, installing epng must not bring CUDA libraries of its own (~4 GB)
    [ "$(cuda)" = "$before" ] || { echo "installing $name pulled CUDA packages:" >&2; cuda >&2; exit 1; }
    mkdir "$work/run" && cd "$work/run"
    # the package must come from the venv, not from this checkout
    "$work/venv/bin/python" -c "import epng, sys; assert epng.__file__.startswith(sys.prefix), epng.__file__"
    "$work/venv/bin/epng" train --max-steps 5 --output-dir out >log.txt 2>&1 || { cat log.txt >&2; echo "$name: epng train failed" >&2; exit 1; }
    for f in out/adapter out/metrics.json; do
        [ -e "$f" ] || { cat log.txt >&2; echo "$name: epng train wrote no $f" >&2; exit 1; }
    done
    cd - >/dev/null
    rm -rf "$work/venv" "$work/run"
    echo "$name: installs in a fresh venv and trains"
done
