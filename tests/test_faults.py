"Fault injection around training (issue 16 §3–4): each fault ends in a clear error or a safe fallback, never a bad save."
import dataclasses, json, math, os, shutil, signal, socket, subprocess, sys, textwrap, time, warnings
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file, save_file
import epng
from epng.cli import main
from epng.io import load_state
from epng.loop import EPNG_STATE
from epng.train import TrainArgs, train, checkpoint_dir, inspect_checkpoint

T = sys.modules["epng.train"]
ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(max_steps=10, warmup_steps=4, cycle_interval=4, limit=32, batch_size=4)
BWRAP = shutil.which("bwrap")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads()),
            "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}


def _metrics(out) -> dict: return json.loads((Path(out) / "metrics.json").read_text())


def _finite_checkpoint(folder: Path) -> bool:
    state = load_state(folder, "trainer")
    fresh, _ = T.load_model_and_tokenizer("embedded")
    h = epng.load_adapter(fresh, folder / "adapter")
    moments = [v for s in state["optimizer"]["state"].values() for v in s.values()]
    return all(torch.isfinite(t).all() for t in [*h.parameters(), *moments])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    "One uninterrupted run with a checkpoint after every step."
    out = tmp_path_factory.mktemp("faults") / "full"
    return out, train(TrainArgs(**SMALL, save_steps=1, output_dir=str(out)), progress=False)


def _poison(monkeypatch, forward: int, how):
    "From the next model loaded on, call `how(output)` on the `forward`-th forward pass."
    real = T.load_model_and_tokenizer
    def load(*a, **k):
        model, tok = real(*a, **k)
        calls = {"n": 0}
        def hook(module, args, output):
            calls["n"] += 1
            if calls["n"] == forward: how(output)
            return output
        model.register_forward_hook(hook)
        return model, tok
    monkeypatch.setattr(T, "load_model_and_tokenizer", load)


def _no_model(monkeypatch):
    "Loading a model fails the test: the error had to come before it."
    def load(*a, **k): raise AssertionError("the model was loaded before the error")
    monkeypatch.setattr(T, "load_model_and_tokenizer", load)


# ---------------------------------------------------------------- NaN gradient with a finite loss
@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_nan_gradient_stops_at_its_step_and_names_the_last_finite_checkpoint(tmp_path, monkeypatch, clip):
    _poison(monkeypatch, 5, lambda out: out.loss.register_hook(lambda g: g * float("nan")))   # loss finite, grads NaN
    with pytest.raises(epng.EPnGError, match=r"gradient norm is nan \(with a finite loss.*step 5.*lower lr.*checkpoint-4"):
        train(TrainArgs(**SMALL, save_steps=1, max_grad_norm=clip, output_dir=str(tmp_path)), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint-{k}" for k in range(1, 5)]
    assert _finite_checkpoint(tmp_path / "checkpoint-4")


def test_lower_lr_on_resume_is_applied_and_recorded(full_run, tmp_path):
    out, full = full_run
    shutil.copytree(checkpoint_dir(out, 4), checkpoint_dir(tmp_path, 4))
    r = train(TrainArgs(**{**SMALL, "lr": 1e-3, "max_grad_norm": 0.5}, resume="latest", save_steps=3,
                        output_dir=str(tmp_path)), progress=False)
    change = {"step": 5, "lr": [3e-3, 1e-3], "max_grad_norm": [1.0, 0.5]}
    assert r["changes"] == [change] and _metrics(tmp_path)["setting_changes"] == [change]
    assert load_state(checkpoint_dir(tmp_path, 10), "trainer")["changes"] == [change]
    assert r["losses"][:5] == full["losses"][:5] and r["losses"][5:] != full["losses"][5:]
    assert all(math.isfinite(l) for l in r["losses"])
    # the schedule kept its position: after step 6 the lr is the new lr times the decay factor at step 6
    opt_lr = load_state(checkpoint_dir(tmp_path, 6), "trainer")["optimizer"]["param_groups"][0]["lr"]
    assert opt_lr == pytest.approx(1e-3 * (1 - 6 / 10))
    # a second resume compares with the new settings and records nothing new
    r2 = train(TrainArgs(**{**SMALL, "lr": 1e-3, "max_grad_norm": 0.5}, resume=str(checkpoint_dir(tmp_path, 6)),
                         output_dir=str(tmp_path / "again")), progress=False)
    assert r2["changes"] == [change] and r2["losses"] == r["losses"]


def test_state_files_follow_the_umask(full_run):
    out, _ = full_run
    mask = os.umask(0o022); os.umask(mask)
    for f in ["trainer.json", "trainer.safetensors", "args.json"]:
        assert (checkpoint_dir(out, 3) / f).stat().st_mode & 0o777 == 0o666 & ~mask, f


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")   # the patch below
def test_nonfinite_factors_are_never_saved(tmp_path, monkeypatch):
    real = T.make_optimizer
    def make(*a, **k):                                  # after step 3's update a factor overflows to inf
        opt, sched = real(*a, **k)
        step, n = opt.step, {"k": 0}
        def poisoned(*sa, **sk):
            out = step(*sa, **sk); n["k"] += 1
            if n["k"] == 3:
                with torch.no_grad(): opt.param_groups[0]["params"][0].view(-1)[0] = float("inf")
            return out
        opt.step = poisoned
        return opt, sched
    monkeypatch.setattr(T, "make_optimizer", make)
    with pytest.raises(epng.EPnGError, match=r"trainable parameter 0 .* non-finite values at step 3.*checkpoint-2"):
        train(TrainArgs(**SMALL, save_steps=1, output_dir=str(tmp_path)), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2"]


# ---------------------------------------------------------------- options checked before the model loads
BAD = [(dict(max_grad_norm=-1), "max_grad_norm must be a finite number >= 0"),
       (dict(max_grad_norm=float("nan")), "max_grad_norm"), (dict(max_grad_norm=float("inf")), "max_grad_norm"),
       (dict(weight_decay=-1), "weight_decay must be a finite number >= 0"),
       (dict(weight_decay=float("nan")), "weight_decay"),
       (dict(lora_alpha=float("inf")), "lora_alpha"), (dict(lora_alpha=float("nan")), "lora_alpha"),
       (dict(lr=float("nan")), "lr must be"), (dict(lr=float("inf")), "lr must be"), (dict(lr=-1e-3), "lr must be"),
       (dict(importance_decay=float("nan")), "importance_decay"), (dict(prune_ratio=float("nan")), "prune_ratio"),
       (dict(grow_ratio=float("inf")), "grow_ratio"),
       (dict(seed=time.time_ns()), "time.time_ns() % 2**32"), (dict(seed=-1), "seed"),
       (dict(dist_timeout=float("inf")), "dist_timeout"), (dict(max_length=0), "max_length"),
       (dict(esft_criterion="loss"), "esft_criterion"), (dict(batch_size=2.5), "batch_size")]


@pytest.mark.parametrize("change,message", BAD, ids=[next(iter(c)) + "=" + str(next(iter(c.values()))) for c, _ in BAD])
def test_bad_options_are_refused_before_the_model_loads(tmp_path, monkeypatch, change, message):
    _no_model(monkeypatch)
    with pytest.raises(epng.EPnGError, match="invalid training settings") as e:
        train(TrainArgs(**{**SMALL, **change}, output_dir=str(tmp_path / "run")), progress=False)
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()


def test_bad_options_on_the_command_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", "--max-grad-norm", "-1", "--weight-decay", "nan", "--output-dir", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "max_grad_norm must be a finite number >= 0" in err and "weight_decay" in err and "Traceback" not in err


def test_largest_seed_trains(tmp_path):
    r = train(TrainArgs(**{**SMALL, "max_steps": 2}, seed=2**32 - 1, output_dir=str(tmp_path)), progress=False)
    assert len(r["losses"]) == 2 and all(math.isfinite(l) for l in r["losses"])


@pytest.mark.parametrize("change", [dict(rank=64), dict(prune_ratio=0.9, grow_ratio=0.05)])
def test_settings_that_cannot_survive_a_cycle_are_refused_before_step_1(tmp_path, monkeypatch, change):
    _poison(monkeypatch, 1, lambda out: pytest.fail("a training step ran"))
    with pytest.raises(epng.EPnGError, match="cannot survive a prune-and-grow cycle.*Nothing was trained"):
        train(TrainArgs(**SMALL, **change, output_dir=str(tmp_path)), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_rank_at_the_limit_trains_when_no_cycle_runs(tmp_path):
    r = train(TrainArgs(**{**SMALL, "max_steps": 3}, rank=64, output_dir=str(tmp_path)), progress=False)
    assert r["controller"].history == [] and len(r["losses"]) == 3


# ---------------------------------------------------------------- the output folder
def test_output_dir_in_the_way_fails_before_the_model_loads(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(epng.EPnGError, match="output_dir .*file is a file"):
        train(TrainArgs(**SMALL, output_dir=str(tmp_path / "file")), progress=False)
    with pytest.raises(epng.EPnGError, match=r"output_dir .*file/run cannot be written \(Not a directory\)"):
        train(TrainArgs(**SMALL, output_dir=str(tmp_path / "file" / "run")), progress=False)


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    for name in [".checkpoint-6.tmp-ab12cd_9", ".adapter.tmp-xy34zw56"]:     # tempfile's 8 characters of [a-z0-9_]
        (tmp_path / name).mkdir(); (tmp_path / name / "half").write_bytes(b"x")
    (tmp_path / ".metrics.json.tmp-q1w2e3r4").write_text("{")
    train(TrainArgs(**{**SMALL, "max_steps": 2}, output_dir=str(tmp_path)), progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _sandboxed(script: str, *bwrap_args, timeout=240) -> subprocess.CompletedProcess:
    "Run python `script` under bubblewrap with the whole machine visible and `bwrap_args` on top."
    done = subprocess.run([BWRAP, "--dev-bind", "/", "/", *bwrap_args, sys.executable, "-c", script],
                          capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT)
    if done.returncode != 0 and done.stderr.startswith("bwrap:"):   # no user namespaces here, say
        pytest.skip(f"bubblewrap cannot sandbox here: {done.stderr.strip()[:200]}")
    return done


@pytest.mark.skipif(BWRAP is None, reason="bubblewrap (bwrap) is not installed")
def test_read_only_output_dir_fails_before_training(tmp_path):
    (tmp_path / "ro").mkdir()
    script = textwrap.dedent(f'''
        import sys, epng.train
        T = sys.modules["epng.train"]   # the module: `epng.train` is the function
        def load(*a, **k): raise SystemExit("the model was loaded before the error")
        T.load_model_and_tokenizer = load
        import epng.cli; epng.cli.main(["train", "--output-dir", "{tmp_path}/ro/run"])
    ''')
    done = _sandboxed(script, "--ro-bind", str(tmp_path / "ro"), str(tmp_path / "ro"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{tmp_path}/ro/run cannot be written (Read-only file system)" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(BWRAP is None, reason="bubblewrap (bwrap) is not installed")
def test_full_disk_names_the_folder_and_keeps_the_previous_checkpoint(tmp_path):
    # a 10 MB file system: the first two checkpoints (about 2 + 4.6 MB) fit, the third does not
    disk = tmp_path / "disk"; disk.mkdir()
    script = textwrap.dedent(f'''
        import json, sys, epng
        from epng.train import TrainArgs, train, inspect_checkpoint, checkpoint_folders
        args = TrainArgs(max_steps=10, warmup_steps=4, cycle_interval=4, limit=32, batch_size=4, save_steps=1,
                         output_dir="{disk}/run")
        try: train(args, progress=False); error = None
        except epng.EPnGError as e: error = str(e)
        run = args.resolved()
        intact = [p.name for p in checkpoint_folders(run.output_dir) if inspect_checkpoint(p, run)]
        import os
        print(json.dumps({{"error": error, "intact": intact, "all": sorted(os.listdir(run.output_dir))}}))
    ''')
    done = _sandboxed(script, "--size", str(10 * 2**20), "--tmpfs", str(disk))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert f"{disk}/run" in result["error"] and "No space left on device" in result["error"]
    saved = [n for n in result["all"] if n.startswith("checkpoint-")]
    assert saved and sorted(result["intact"]) == sorted(saved)        # every checkpoint left is complete and loads
    assert not [n for n in result["all"] if n.startswith(".")]        # the failed save's temp folder is gone


# ---------------------------------------------------------------- damaged and planted checkpoints
class Payload:
    "Unpickling this runs a shell command: the planted checkpoint's attack."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))


def _plant_pickle(folder: Path, name: str, marker: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 1, "payload": Payload(marker)}, folder / name)


def test_planted_pickle_checkpoint_runs_nothing(full_run, tmp_path, monkeypatch):
    out, full = full_run
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    shutil.copytree(checkpoint_dir(out, 5), checkpoint_dir(run, 5))
    planted = checkpoint_dir(run, 999999)
    shutil.copytree(checkpoint_dir(out, 5), planted)
    for f in ["trainer.json", "trainer.safetensors"]: (planted / f).unlink()
    _plant_pickle(planted, "trainer.pt", marker)
    with pytest.raises(epng.EPnGError, match="older epng as a pickle, which is not loaded because unpickling can run"):
        train(TrainArgs(**SMALL, resume=str(planted), output_dir=str(run)), progress=False)
    with pytest.warns(UserWarning, match="skips checkpoint-999999: .*trainer.pt is not loaded"):
        r = train(TrainArgs(**SMALL, resume="latest", output_dir=str(run)), progress=False)
    assert r["losses"] == full["losses"] and not marker.exists()
    # the Trainer callback's old state file is refused the same way
    trainer_ckpt = tmp_path / "trainer-out" / "checkpoint-4"
    _plant_pickle(trainer_ckpt, "epng_state.pt", marker)
    h = epng.attach(T.load_model_and_tokenizer("embedded")[0], epng.EPnGConfig(rank=4))
    with pytest.raises(epng.EPnGError, match="epng_state.pt is not loaded: it was written by an older epng"):
        epng.EPnGCallback(h).restore(str(trainer_ckpt))
    assert not marker.exists()


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path); edit(tensors); save_file(tensors, path)


def test_resume_latest_falls_back_to_the_newest_intact_checkpoint(full_run, tmp_path):
    out, full = full_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=lambda d, names: [n for n in names if n.startswith("checkpoint-") is False]
                    if Path(d) == out else [])
    raw = (checkpoint_dir(run, 10) / "trainer.safetensors").read_bytes()            # 10: truncated trainer state
    (checkpoint_dir(run, 10) / "trainer.safetensors").write_bytes(raw[:len(raw) // 2])
    def minus_three(t): t["layers.0.ranks"][0] = -3                                  # 9: an edited rank
    _edit_tensors(checkpoint_dir(run, 9) / "adapter" / "epng_adapter.safetensors", minus_three)
    def nan_moment(t): t["optimizer.state.0.exp_avg"].view(-1)[0] = float("nan")    # 8: a NaN Adam moment
    _edit_tensors(checkpoint_dir(run, 8) / "trainer.safetensors", nan_moment)
    (checkpoint_dir(run, 7) / "adapter" / "epng_adapter.safetensors").write_bytes(b"")   # 7: empty adapter file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = train(TrainArgs(**SMALL, resume="latest", save_steps=1, output_dir=str(run)), progress=False)
    skipped = [str(w.message) for w in caught if "skips" in str(w.message)]
    assert [s.split(":")[0] for s in skipped] == [f"resume='latest' skips checkpoint-{k}" for k in (10, 9, 8, 7)]
    assert "trainer.safetensors cannot be read" in skipped[0]
    assert "optimizer's exp_avg of parameter 0 holds 1 non-finite values" in skipped[2]
    assert r["losses"] == full["losses"] and r["tuner"].ranks.equal(full["tuner"].ranks)   # resumed from 6, exactly
    assert all(inspect_checkpoint(checkpoint_dir(run, k), r["args"]) for k in range(7, 11))  # rewritten intact


def test_a_checkpoint_that_fails_after_the_model_loaded_falls_back_on_a_fresh_model(full_run, tmp_path):
    out, full = full_run
    run = tmp_path / "run"
    for k in (3, 10): shutil.copytree(checkpoint_dir(out, k), checkpoint_dir(run, k))
    meta = checkpoint_dir(run, 10) / "trainer.json"     # 10: its adapter loads (and grows the factors), its optimizer
    record = json.loads(meta.read_text())               # state then names one parameter too few
    record["state"]["optimizer"]["param_groups"][0]["params"].pop()
    meta.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="skips checkpoint-10: .*param group 0 does not hold this run's AdamW"):
        r = train(TrainArgs(**SMALL, resume="latest", output_dir=str(run)), progress=False)
    assert r["losses"] == full["losses"] and r["tuner"].ranks.equal(full["tuner"].ranks)   # from checkpoint-3, exactly


def test_resume_path_is_checked_before_the_model_loads(full_run, tmp_path, monkeypatch):
    out, _ = full_run
    bad = tmp_path / "checkpoint-3"
    shutil.copytree(checkpoint_dir(out, 3), bad)
    (bad / "trainer.json").write_bytes(b"\xff\xfe{")
    _no_model(monkeypatch)
    with pytest.raises(epng.EPnGError, match="trainer.json is not UTF-8 text"):
        train(TrainArgs(**SMALL, resume=str(bad), output_dir=str(tmp_path / "run")), progress=False)
    with pytest.raises(epng.EPnGError, match="cannot resume.*rank: 8 → 4"):
        train(TrainArgs(**SMALL, rank=4, resume=str(checkpoint_dir(out, 3)), output_dir=str(tmp_path / "run")),
              progress=False)


# ---------------------------------------------------------------- two processes, one hangs
HANGER = textwrap.dedent('''
    "One process of a two-process `epng train`; process 1 stops itself (SIGSTOP) in its third forward pass."
    import os, signal, sys, torch, epng.cli, epng.train
    T = sys.modules["epng.train"]
    real = T.load_model_and_tokenizer
    def load(*a, **k):
        model, tok = real(*a, **k)
        calls = {"n": 0}
        def hook(*_):
            calls["n"] += 1
            if calls["n"] == 3 and os.environ["RANK"] == "1": os.kill(os.getpid(), signal.SIGSTOP)
        model.register_forward_hook(hook)
        return model, tok
    T.load_model_and_tokenizer = load
    epng.cli.main(sys.argv[1:])
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def test_a_hung_process_ends_the_run_after_dist_timeout(tmp_path):
    (tmp_path / "hanger.py").write_text(HANGER)
    port = _free_port()
    argv = [sys.executable, str(tmp_path / "hanger.py"), "train", "--max-steps", "6", "--limit", "32",
            "--batch-size", "2", "--dist-timeout", "10", "--output-dir", str(tmp_path / "run")]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              env={**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                                   "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    try:
        _, err = procs[0].communicate(timeout=180)
        assert procs[0].returncode == 2, err[-3000:]
        assert "process 0: the other processes did not answer within dist_timeout=10 s" in err
        assert procs[1].poll() is None                  # the stopped peer is still there: nothing waited for it to end
    finally:
        for p in procs:
            if p.poll() is None: p.kill()
            p.communicate()


# ---------------------------------------------------------------- Trainer + EPnGCallback
def _trainer_run(out, skip_save_at=None, resume=None):
    from transformers import Trainer, TrainingArguments
    torch.manual_seed(0)
    model, tok = T.load_model_and_tokenizer("embedded")
    h = epng.attach(model, epng.EPnGConfig(rank=4, lora_alpha=8, warmup_steps=2, cycle_interval=2))
    callback = epng.EPnGCallback(h, "epng")
    if skip_save_at:                                     # as if the run was killed between the two saves
        real = callback.on_save
        def on_save(args, state, *a, **k):
            if state.global_step != skip_save_at: real(args, state, *a, **k)
        callback.on_save = on_save
    data = epng.SFTDataset(epng.embedded_dataset(limit=32), tok, max_length=128)
    args = TrainingArguments(str(out), max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3, save_steps=3,
                             report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, logging_steps=100,
                             remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback],
                      data_collator=lambda rows: epng.collate(rows, data.pad_id))
    folder = callback.restore(resume) if resume else None
    trainer.train(resume_from_checkpoint=folder)
    return h, folder


def test_trainer_checkpoint_without_epng_state_is_incomplete_and_restore_uses_the_previous(tmp_path):
    out = tmp_path / "out"
    full, _ = _trainer_run(out, skip_save_at=6)          # checkpoints 3, 6 (no epng state) and 8
    shutil.rmtree(out / "checkpoint-8", ignore_errors=True)   # the run died after checkpoint-6's Trainer files
    assert (out / "checkpoint-6").is_dir() and not (out / "checkpoint-6" / EPNG_STATE).exists()
    h = epng.attach(T.load_model_and_tokenizer("embedded")[0], epng.EPnGConfig(rank=4, lora_alpha=8))
    with pytest.raises(epng.EPnGError, match=r"checkpoint-6 is incomplete.*not written by a Trainer with EPnGCallback"
                                             r".*newest complete checkpoint before it is .*checkpoint-3"):
        epng.EPnGCallback(h).restore(str(out / "checkpoint-6"))
    with pytest.warns(UserWarning, match="skipping checkpoint-6: .*incomplete"):
        resumed, folder = _trainer_run(tmp_path / "again", resume=str(out))
    assert Path(folder).name == "checkpoint-3"
    assert resumed.ranks.equal(full.ranks)               # the resumed run ends where the uninterrupted one did
    for a, b in zip(resumed.parameters(), full.parameters()): torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- unreadable model files
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "nano"
    model, tok = T.load_model_and_tokenizer("embedded")
    model.save_pretrained(folder); tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("damage,message", [
    ("truncated", "model.safetensors is .* bytes and unreadable .*truncated or damaged"),
    ("empty", "model.safetensors is empty"),
    ("utf16", "config.json is not UTF-8 text"),
    ("latin1", "config.json is not UTF-8 text"),
    ("notjson", "config.json is not valid JSON"),
    ("deep", "config.json nests its JSON deeper than Python can parse")])
def test_unreadable_model_files_are_named(model_folder, tmp_path, damage, message):
    folder = tmp_path / "m"
    shutil.copytree(model_folder, folder)
    weights, config = folder / "model.safetensors", folder / "config.json"
    if damage == "truncated": weights.write_bytes(weights.read_bytes()[:1000])
    if damage == "empty": weights.write_bytes(b"")
    if damage == "utf16": config.write_text(config.read_text(), encoding="utf-16")
    if damage == "latin1": config.write_bytes(config.read_bytes().replace(b'"olmoe"', '"olmoé"'.encode("latin-1")))
    if damage == "notjson": config.write_text(config.read_text()[:-20])
    if damage == "deep": config.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(epng.EPnGError, match=message):
        train(TrainArgs(**SMALL, model=str(folder), output_dir=str(tmp_path / "run")), progress=False)


def test_an_adapter_whose_ranks_break_the_budget_is_damaged(full_run, tmp_path):
    "Ranks edited consistently (JSON, rank_sum, tensor and slot owners agree) but no longer at the budget."
    out, full = full_run
    folder = tmp_path / "checkpoint-10"
    shutil.copytree(checkpoint_dir(out, 10), folder)
    meta_file = folder / "adapter" / "epng_adapter.json"
    meta = json.loads(meta_file.read_text())
    row = meta["ranks"][0]
    e = next(i for i, r in enumerate(row) if 0 < r and (r < max(row) or row.count(max(row)) > 1))  # not the layer's widest
    row[e] = 0
    meta["rank_sum"] = sum(map(sum, meta["ranks"]))
    meta_file.write_text(json.dumps(meta))
    def drop(t):
        t["layers.0.ranks"][e] = 0
        t["layers.0.slot_owner"][t["layers.0.slot_owner"] == e] = -1
    _edit_tensors(folder / "adapter" / "epng_adapter.safetensors", drop)
    with pytest.raises(T.DamagedCheckpointError, match=f"add up to {meta['rank_sum']}, but epng keeps them at the budget"):
        inspect_checkpoint(folder, full["args"])


def test_a_deeply_nested_model_file_is_named(model_folder, tmp_path):
    "check_model_files itself, for a JSON file besides config.json that read_config does not read."
    folder = tmp_path / "m"
    shutil.copytree(model_folder, folder)
    (folder / "tokenizer_config.json").write_text("{\"a\": " * 50_000 + "1" + "}" * 50_000)
    with pytest.raises(epng.EPnGError, match="tokenizer_config.json nests its JSON deeper"):
        T.check_model_files(folder)


# ---------------------------------------------------------------- crafted trainer state (red team 4)
NAN = {"__float__": "nan"}
def _group(**kw): return lambda s: s["optimizer"]["param_groups"][0].update(kw)
def _fill(key, value): return lambda t: t[key].fill_(value)
CRAFTED = {   # case: (edit of trainer.json's state, edit of trainer.safetensors, what the error says)
    "lr_nan": (_group(lr=NAN), None, "param group 0 has lr nan, but this run's settings give"),
    "lr_str": (_group(lr="fast"), None, "param group 0 has lr 'fast'"),
    "eps_zero": (_group(eps=0.0), None, "param group 0 has eps 0.0"),
    "betas_big": (_group(betas={"__tuple__": [5.0, -3.0]}), None, "param group 0 has betas \\(5.0, -3.0\\)"),
    "wd_neg": (_group(weight_decay=-100.0), None, "param group 0 has weight_decay -100.0"),
    "amsgrad": (_group(amsgrad=True), None, "param group 0 has amsgrad True"),
    "base_lrs_nan": (lambda s: s["scheduler"].update(base_lrs=[NAN]), None, "scheduler has base_lrs \\[nan\\]"),
    "last_epoch": (lambda s: s["scheduler"].update(last_epoch=3), None, "scheduler has last_epoch 3"),
    "step_neg": (None, _fill("optimizer.state.0.step", -1e9), "step count of parameter 0 is -1000000000.0"),
    "step_frac": (None, _fill("optimizer.state.1.step", 2.5), "step count of parameter 1 is 2.5"),
    "rng_zero": (None, _fill("rng.torch", 0), "random states in trainer.json/.safetensors are not torch's"),
    "imp_nan": (None, _fill("controller.importance.sums", float("nan")), "importance sums is not finite"),
    "imp_neg": (None, _fill("controller.importance.sums", -1e30), "importance sums is negative"),
    "history_junk": (lambda s: s["controller"]["history"][0].update(step="two"), None, "cycle record 0 has step 'two'"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_trainer_state_is_damage_named_and_latest_falls_back(full_run, tmp_path, case):
    edit_json, edit_tensors, message = CRAFTED[case]
    out, full = full_run
    run = tmp_path / "run"
    for k in (9, 10): shutil.copytree(checkpoint_dir(out, k), checkpoint_dir(run, k))
    crafted = checkpoint_dir(run, 10)
    if edit_json:
        record = json.loads((crafted / "trainer.json").read_text())
        edit_json(record["state"]); (crafted / "trainer.json").write_text(json.dumps(record))
    if edit_tensors: _edit_tensors(crafted / "trainer.safetensors", edit_tensors)
    with pytest.raises(T.DamagedCheckpointError, match=f"{crafted}.*{message}"):      # given explicitly: named, refused
        train(TrainArgs(**SMALL, resume=str(crafted), output_dir=str(run)), progress=False)
    with pytest.warns(UserWarning, match=f"skips checkpoint-10: .*{message}"):
        r = train(TrainArgs(**SMALL, resume="latest", output_dir=str(run)), progress=False)
    assert r["losses"] == full["losses"] and r["tuner"].ranks.equal(full["tuner"].ranks)   # from checkpoint-9, exactly


# ---------------------------------------------------------------- planted folders (red team 9, 10)
def test_latest_skips_misnamed_linked_nested_and_foreign_checkpoints(full_run, tmp_path):
    out, full = full_run
    run, outside = tmp_path / "run", tmp_path / "outside"
    for k in (8, 9): shutil.copytree(checkpoint_dir(out, k), checkpoint_dir(run, k))
    shutil.copytree(checkpoint_dir(out, 3), run / "checkpoint-999999")          # an old state under a newer name
    shutil.copytree(checkpoint_dir(out, 10), outside)
    os.symlink(outside, run / "checkpoint-50")                                  # a link: no checkpoint of this run
    shutil.copytree(checkpoint_dir(out, 9), run / "checkpoint-40")              # another run's settings
    saved = json.loads((run / "checkpoint-40" / "args.json").read_text())
    (run / "checkpoint-40" / "args.json").write_text(json.dumps({**saved, "rank": 4}))
    shutil.copytree(checkpoint_dir(out, 9), run / "checkpoint-30")              # settings nested past any parser
    (run / "checkpoint-30" / "args.json").write_text("[" * 100_000 + "]" * 100_000)
    assert T.checkpoint_folders(run) == [run / f"checkpoint-{k}" for k in (999999, 40, 30, 9, 8)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = next(T.resume_candidates(dataclasses.replace(full["args"], resume="latest", output_dir=str(run))))
    assert found["folder"] == checkpoint_dir(run, 9) and found["state"]["step"] == 9
    skipped = [str(w.message) for w in caught if "skips" in str(w.message)]
    assert len(skipped) == 3
    assert "checkpoint-999999" in skipped[0] and "holds the state after step 3, not 999999" in skipped[0]
    assert "checkpoint-40" in skipped[1] and "cannot resume" in skipped[1] and "rank: 4 → 8" in skipped[1]
    assert "checkpoint-30" in skipped[2] and "args.json nests its JSON deeper" in skipped[2]
    with pytest.raises(epng.EPnGError, match="checkpoint-40: cannot resume.*rank: 4 → 8") as e:   # given explicitly
        next(T.resume_candidates(dataclasses.replace(full["args"], resume=str(run / "checkpoint-40"))))
    assert not isinstance(e.value, T.DamagedCheckpointError)


def test_latest_with_only_foreign_checkpoints_says_which_settings_differ(full_run, tmp_path):
    out, full = full_run
    shutil.copytree(checkpoint_dir(out, 9), checkpoint_dir(tmp_path, 9))
    args = dataclasses.replace(full["args"], rank=4, resume="latest", output_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="skips checkpoint-9"), pytest.raises(epng.EPnGError, match="rank: 8 → 4"):
        next(T.resume_candidates(args))


# ---------------------------------------------------------------- links in the output folder (red team 3, 11)
def test_the_end_of_a_run_never_writes_through_links(full_run, tmp_path):
    out, _ = full_run
    outside = tmp_path / "outside"; outside.mkdir()
    (outside / "precious.txt").write_text("mine")
    run = tmp_path / "run"
    shutil.copytree(checkpoint_dir(out, 10), checkpoint_dir(run, 10))
    (run / "figures").mkdir()
    os.symlink(outside / "precious.txt", run / "figures" / "loss.png")
    os.symlink(outside / "precious.txt", run / "metrics.json")
    train(TrainArgs(**SMALL, resume="latest", output_dir=str(run)), progress=False)   # step 10 of 10: save_run only
    assert (outside / "precious.txt").read_text() == "mine" and os.listdir(outside) == ["precious.txt"]
    assert not (run / "figures" / "loss.png").is_symlink() and (run / "figures" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not (run / "metrics.json").is_symlink() and _metrics(run)["steps"] == 10
    shutil.rmtree(run / "figures"); os.symlink(outside, run / "figures")       # figures itself a link: refused
    with pytest.raises(epng.EPnGError, match="figures is a link or a file, not the run's figures folder"):
        train(TrainArgs(**SMALL, resume="latest", output_dir=str(run)), progress=False)
    assert os.listdir(outside) == ["precious.txt"] and (outside / "precious.txt").read_text() == "mine"


def test_overwrite_removes_links_and_never_follows_them(tmp_path):
    outside = tmp_path / "outside"; outside.mkdir()
    (outside / "keep.txt").write_text("x")
    run = tmp_path / "run"; run.mkdir()
    for name in ("checkpoint-4", "figures", "adapter"): os.symlink(outside, run / name)
    os.symlink(outside / "keep.txt", run / "metrics.json")
    (run / "checkpoint-2").mkdir(); os.symlink(outside, run / "checkpoint-2" / "adapter")   # a link inside one
    (run / "notes.txt").write_text("mine")
    T.run_folder(TrainArgs(**SMALL, output_dir=str(run), overwrite=True).resolved(), 0, 1, "cpu")
    assert os.listdir(run) == ["notes.txt"]
    assert os.listdir(outside) == ["keep.txt"] and (outside / "keep.txt").read_text() == "x"


def test_an_oversized_model_json_is_not_read(model_folder, tmp_path, monkeypatch):
    "A JSON file past the limit is refused by its size alone: it is never read, let alone parsed."
    folder = tmp_path / "m"
    shutil.copytree(model_folder, folder)
    with open(folder / "tokenizer.json", "r+b") as f: f.truncate(T.MAX_MODEL_JSON_BYTES + 1)   # sparse: no disk used
    read = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.name) or real(self))
    with pytest.raises(epng.EPnGError, match="tokenizer.json is .* bytes, more than any model's JSON"):
        T.check_model_files(folder)
    assert "tokenizer.json" not in read
