"""What each prune-and-grow cycle does to the loss in the study's setting (notebook 15a): EPnG on the nano task with
`STUDY_SETTINGS`, one run per λ given, printing for every cycle the mean loss of the 5 steps before and after it and
how many experts it pruned, then the final rank map.

    python benchmarks/study_cycles.py 0.2 0.5          # λ values; seed 0, one torch thread
"""
import statistics, sys, tempfile
import torch
from epng.compare import write_nano_rows
from epng.nano import nano_model_path
from epng.settings import TrainArgs
from epng.study import STUDY_DATA, STUDY_SETTINGS
from epng.train import train

if __name__ == "__main__":
    torch.set_num_threads(1)
    rows = write_nano_rows(tempfile.mkdtemp(), STUDY_DATA["n_train"])
    for decay in [float(x) for x in sys.argv[1:] or ["0.2"]]:
        with tempfile.TemporaryDirectory() as out:
            run = train(TrainArgs(model=str(nano_model_path()), dataset=str(rows), method="epng", seed=0, bf16=False,
                                  output_dir=out, importance_decay=decay, **STUDY_SETTINGS), progress=False)
        losses = run["losses"]
        print(f"λ = {decay}: loss of the last 20 steps {statistics.mean(losses[-20:]):.3f}")
        for c in run["controller"].history:
            before, after = statistics.mean(losses[c.step - 5:c.step]), statistics.mean(losses[c.step:c.step + 5])
            print(f"  cycle at step {c.step:3d}: pruned {int(c.pruned.sum()):2d}, loss {before:.3f} -> {after:.3f}")
        ranks = run["tuner"].ranks
        print(f"  experts holding ranks per layer: {(ranks > 0).sum(1).tolist()}; final ranks:\n{ranks.tolist()}")
