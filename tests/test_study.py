"The study of notebook 15a: its statistics, its bookkeeping (resume, refusal, workers) and the shipped results."
import json, math, os, statistics
import pytest
import torch
import epng.study as study
from epng.moe import EPnGError
from epng.study import (QUICK, STUDY_DATA, STUDY_SETTINGS, SWEEPS, VARIANTS, load_study, mean_ci, paired_difference,
                        run_key, run_study, study_cells, study_jobs, study_table, verdict)


def test_interval_and_verdict_against_hand_numbers():
    # n = 4: t(0.975, 3) = 3.182; values 0.1, 0.2, 0.3, 0.4 have s = 0.1291
    m, h = mean_ci([0.1, 0.2, 0.3, 0.4])
    assert math.isclose(m, 0.25) and math.isclose(h, 3.182 * 0.12909944 / 2, rel_tol=1e-6)
    # paired: the same +0.05 on every seed is resolved however large the seeds' spread
    ref = {0: 0.2, 1: 0.9, 2: 0.5}
    d, dh, n = paired_difference({s: v + 0.05 for s, v in ref.items()}, ref)
    assert n == 3 and math.isclose(d, 0.05) and dh < 1e-12 and verdict(d, dh) == "better"
    d, dh, n = paired_difference({0: 0.3, 1: 0.8, 2: 0.5}, ref)        # +0.1, -0.1, 0: cannot tell
    assert verdict(d, dh) == "not resolved"
    assert verdict(-0.2, 0.1) == "worse" and verdict(0.2, math.nan) == "not resolved"
    assert paired_difference({5: 0.1}, ref)[2] == 0                    # no seed in common
    with pytest.raises(EPnGError, match="no finished run"): mean_ci([])


def test_jobs_share_runs_and_refuse_unknown_names():
    jobs = study_jobs(seeds=10, sweep_seeds=3)
    keys = [run_key(j, STUDY_SETTINGS, STUDY_DATA) for j in jobs]
    assert sum(j["group"] == "main" for j in jobs) == 10 * len(VARIANTS)
    # the rank sweep's r0 = 2, the fraction sweep's 0.1 (epng_0.1) and 0.2, λ's 0.2 and T_p's 30 are the table's runs
    assert len(set(keys)) == len(keys) - 2 * 3 - 3 - 3 - 3 - 3 == 139
    assert [j["seed"] for j in jobs[:len(VARIANTS) + 1]] == [0] * len(VARIANTS) + [1]   # seed by seed
    for bad in (dict(variants=["lora"]), dict(sweeps=["alpha"])):
        with pytest.raises(EPnGError, match="unknown variants or sweeps"): study_jobs(**bad)
    assert study_jobs(1, 1, ["static"], ["rank"]) == study_jobs(1, 1, ["static"], {"rank": SWEEPS["rank"]})


@pytest.fixture
def counted(monkeypatch):
    "`_run_job` as it is, counting its calls; `fail` names a method whose runs raise."
    class Calls(list): fail = None
    calls, real = Calls(), study._run_job
    def run(job, *args, **kwargs):
        calls.append(job["variant"])
        if job["method"] == calls.fail: raise RuntimeError("stopped")
        return real(job, *args, **kwargs)
    monkeypatch.setattr(study, "_run_job", run)
    return calls


def test_a_stopped_study_continues_where_it_stopped(tmp_path, counted):
    torch.set_num_threads(1)
    path = tmp_path / "study.json"
    counted.fail = "epng"
    with pytest.raises(RuntimeError, match="stopped"):
        run_study(path, seeds=1, sweep_seeds=1, variants=["static", "epng"], sweeps=[], progress=False, **QUICK)
    first = json.loads(path.read_text())
    assert [r["method"] for r in first["runs"].values()] == ["static"]      # the finished run was kept
    counted.fail = None
    done = run_study(path, seeds=1, sweep_seeds=1, variants=["static", "epng"], sweeps=[], progress=False, **QUICK)
    assert counted == ["static", "epng", "epng"]                            # static was not run again
    assert sorted(r["method"] for r in done["runs"].values()) == ["epng", "static"]
    assert done["runs"][next(iter(first["runs"]))] == next(iter(first["runs"].values()))
    with pytest.raises(EPnGError, match="other settings"):
        run_study(path, seeds=1, sweep_seeds=1, variants=["static"], sweeps=[], settings=dict(max_steps=5),
                  progress=False, **{"data": QUICK["data"]})
    assert json.loads(path.read_text())["runs"] == done["runs"]              # the refused call changed nothing


def test_two_workers_give_the_runs_one_worker_gives(tmp_path):
    torch.set_num_threads(1)
    args = dict(seeds=2, sweep_seeds=1, variants=["epng"], sweeps=[], progress=False, **QUICK)
    one = run_study(tmp_path / "one.json", workers=1, **args)
    two = run_study(tmp_path / "two.json", workers=2, **args)
    assert set(one["runs"]) == set(two["runs"])
    for key, run in one["runs"].items():   # same seed, one thread each: the same training, bit for bit
        assert {k: v for k, v in run.items() if k != "train_s"} == {k: v for k, v in two["runs"][key].items() if k != "train_s"}


def test_the_shipped_study_is_complete_and_its_table_recomputes():
    shipped = load_study()
    assert shipped["settings"] == STUDY_SETTINGS and shipped["data"] == STUDY_DATA
    cells = study_cells(shipped)
    for variant in VARIANTS: assert len(cells["main", None, variant]) >= 10, variant
    for knob, values in SWEEPS.items():
        for value in values:
            for variant in study.SWEPT.get(knob, ("epng",)):
                assert len(cells[knob, value, variant]) >= 3, (knob, value, variant)
    table = study_table(shipped)
    static = cells["main", None, "static"]
    assert f"{statistics.mean(static.values()):6.1%}" in table.splitlines()[1]
    # every run's share is what its method spends: sieve and static equal, prune-only less, grow-only more
    share = {j["variant"]: shipped["runs"][j["key"]]["share"] for j in shipped["jobs"] if j["group"] == "main"}
    assert math.isclose(share["sieve"], share["static"]) and math.isclose(share["epng"], share["static"])
    assert share["prune_only"] < share["static"] < share["grow_only"]


@pytest.mark.skipif(os.environ.get("EPNG_SLOW") != "1", reason="a full-length run (about a minute): set EPNG_SLOW=1")
def test_a_shipped_run_reproduces():
    "One job of the shipped study run again on one thread: the same score and final loss (same machine type)."
    torch.set_num_threads(1)
    shipped = load_study()
    job = next(j for j in shipped["jobs"] if j["group"] == "main" and j["variant"] == "epng" and j["seed"] == 0)
    from epng.compare import write_nano_rows
    import tempfile
    run = study._run_job(job, shipped["settings"], shipped["data"], str(write_nano_rows(tempfile.mkdtemp(), shipped["data"]["n_train"])))
    saved = shipped["runs"][job["key"]]
    assert (run["flexible"], run["final_loss"]) == (saved["flexible"], saved["final_loss"])
