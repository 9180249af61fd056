#!/usr/bin/env bash
# The second test environment: the lowest transformers that settings.ini allows, with the same torch and everything
# else as the main environment (a venv that sees the system packages and shadows only transformers and what it pins).
# Runs the fast tests and a training run with one prune-and-grow cycle. scripts/test.sh calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
lowest=$(python -c "
import configparser, re
cfg = configparser.ConfigParser(delimiters=['=']); cfg.read('settings.ini')
print(re.search(r'(?:^|\s)transformers>=([\w.]+)', cfg['DEFAULT']['requirements']).group(1))")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/pip" install --quiet --quiet "transformers==$lowest"
"$work/venv/bin/python" -c "
import transformers, epng
assert transformers.__version__ == '$lowest', transformers.__version__
print('epng', epng.__version__, 'on transformers', transformers.__version__)"
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_behaviour.py tests/test_baselines.py tests/test_repro.py tests/test_routers.py \
    tests/test_coverage.py
"$work/venv/bin/python" -m epng.cli train --max-steps 31 --output-dir "$work/run" >"$work/train.log" 2>&1 \
    || { cat "$work/train.log" >&2; exit 1; }
"$work/venv/bin/python" - "$work/run/metrics.json" <<'EOF'
import json, math, sys
m = json.load(open(sys.argv[1]))
assert m["steps"] == 31 and len(m["losses"]) == 31 and all(map(math.isfinite, m["losses"])), m
assert [c["step"] for c in m["cycles"]] == [30] and m["cycles"][0]["pruned"] > 0, m["cycles"]
assert m["losses"][-1] < m["losses"][0], m["losses"]
print(f"epng train: 31 steps, a prune-and-grow cycle at step 30, loss {m['losses'][0]:.3f} -> {m['losses'][-1]:.3f}")
EOF
