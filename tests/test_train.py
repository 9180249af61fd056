"The training loop end to end: `epng train`, several processes, exact resume, Trainer/SFTTrainer, bad input, methods."
import json, math, os, shutil, signal, subprocess, sys, textwrap, warnings
from pathlib import Path
import pytest
import torch
import epng
from epng.cli import main
from epng.moe import find_moe_layers
from epng.train import TrainArgs, train, load_model_and_tokenizer, step_batches, checkpoint_dir, latest_checkpoint
from epng.data import SFTDataset, embedded_dataset
from epng.loop import EPnGController, cycle_steps
from epng.io import load_state
from epng.importance import NonFiniteStatisticsError

T = sys.modules["epng.train"]    # the module: `epng.train` is the function

ROOT = Path(__file__).resolve().parents[1]
# 10 steps, a cycle after steps 4 and 8 (none after the last), 32 rows in batches of 4
SMALL = dict(max_steps=10, warmup_steps=4, cycle_interval=4, limit=32, batch_size=4)
SMALL_FLAGS = ["--max-steps", "10", "--warmup-steps", "4", "--cycle-interval", "4", "--limit", "32", "--batch-size", "4"]
PNG = b"\x89PNG\r\n\x1a\n"


def _env() -> dict:
    "The test's environment for subprocesses, with as many threads as here so that floats agree bit for bit."
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads()),
            "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}


def _cli(*argv, check=True, timeout=240) -> subprocess.CompletedProcess:
    "`python -m epng.cli ...` in a subprocess."
    done = subprocess.run([sys.executable, "-m", "epng.cli", *argv], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=ROOT)
    if check: assert done.returncode == 0, done.stderr[-3000:]
    return done


def _metrics(out) -> dict: return json.loads((Path(out) / "metrics.json").read_text())


def _complete(folder: Path) -> bool:
    "Does a checkpoint folder hold everything a resume reads?"
    return all((folder / f).is_file() for f in ["trainer.json", "trainer.safetensors", "args.json",
                                                 "adapter/epng_adapter.json", "adapter/epng_adapter.safetensors"])


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    "One `epng train` subprocess with a checkpoint after every step: (output folder, its stdout)."
    out = tmp_path_factory.mktemp("cli") / "run"
    done = _cli("train", *SMALL_FLAGS, "--save-steps", "1", "--output-dir", str(out))
    return out, done.stdout


# ---------------------------------------------------------------- 1. the command line
def test_cli_train_prints_ranks_saves_adapter_that_reloads(cli_run):
    out, stdout = cli_run
    metrics = _metrics(out)
    ranks = torch.tensor(metrics["ranks"])
    assert [c["step"] for c in metrics["cycles"]] == [4, 8]
    assert int(ranks.sum()) == 4 * 16 * 8 and not torch.equal(ranks, torch.full_like(ranks, 8))
    # the printed rank table is the saved one, and every saved path is named
    table = [l for l in stdout.splitlines() if l.strip()[:1].isdigit() and "|" in l]
    assert torch.tensor([[int(x) for x in l.split("|")[1].split()] for l in table]).equal(ranks)
    for key, path in [("adapter", out / "adapter"), ("checkpoint", out / "checkpoint-10"),
                      ("figures", out / "figures"), ("metrics", out / "metrics.json")]:
        assert f"{key:10s} saved in {path}" in stdout
    for name in ["loss.png", "prune_grow.png", "importance.png"]:
        assert (out / "figures" / name).read_bytes()[:8] == PNG
    # the adapter loads into a fresh base model and gives the logits of the same run done in this process
    here = train(TrainArgs(**SMALL, output_dir=str(out.parent / "here")), progress=False)
    assert here["losses"] == metrics["losses"]
    fresh, tok = load_model_and_tokenizer("embedded")
    ids = torch.tensor([tok.encode("What is 2 + 3?")])
    with torch.no_grad(): base = fresh(ids).logits
    h = epng.load_adapter(fresh, out / "adapter")
    assert h.ranks.equal(ranks) and h.ranks.equal(here["tuner"].ranks)
    fresh.eval(); here["model"].eval()
    with torch.no_grad(): loaded, trained = fresh(ids).logits, here["model"](ids).logits
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-6)
    assert (loaded - base).abs().max() > 1e-4          # the adapter changed the model


# ---------------------------------------------------------------- 2. several processes
PROBE = textwrap.dedent('''
    "Runs `epng train` through the command line twice (a run, then a resume); every process writes its results."
    import importlib, sys, torch, epng.cli
    T = importlib.import_module("epng.train")    # the module: `epng.cli.main` takes `train` from it when it runs
    out, argv = sys.argv[1], sys.argv[2:]
    calls, train = [], T.train
    def record(args):
        result = train(args, progress=False)
        torch.save({"rank": result["rank"], "world": result["world"], "ranks": result["tuner"].ranks.clone(),
                    "losses": result["losses"], "factors": [p.detach().clone() for p in result["tuner"].parameters()]},
                   f"{out}/process{result['rank']}-run{len(calls)}.pt")
        calls.append(result)
        return result
    T.train = record
    epng.cli.main(argv + ["--save-steps", "5", "--output-dir", f"{out}/run"])
    epng.cli.main(argv + ["--output-dir", f"{out}/resumed", "--resume", f"{out}/run/checkpoint-5"])
''')


def test_two_processes_end_with_identical_ranks_and_factors(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    argv = ["train", *SMALL_FLAGS[:-2], "--batch-size", "2"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29731",
           str(tmp_path / "probe.py"), str(tmp_path), *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    p0, p1 = (torch.load(tmp_path / f"process{r}-run0.pt") for r in (0, 1))
    assert (p0["rank"], p1["rank"], p0["world"], p1["world"]) == (0, 1, 2, 2)
    assert p0["ranks"].equal(p1["ranks"]) and int(p0["ranks"].sum()) == 4 * 16 * 8
    assert not p0["ranks"].equal(torch.full_like(p0["ranks"], 8))       # cycles ran
    assert len(p0["factors"]) == len(p1["factors"])
    for a, b in zip(p0["factors"], p1["factors"]): assert torch.equal(a, b)
    assert p0["losses"] == p1["losses"] == _metrics(tmp_path / "run")["losses"]
    assert done.stdout.count("final ranks") == 2                       # only process 0 reports, once per run
    # resuming the two processes from step 5 (after the cycle at 4, before the one at 8) replays the run
    r0, r1 = (torch.load(tmp_path / f"process{r}-run1.pt") for r in (0, 1))
    assert r0["losses"] == r1["losses"] == p0["losses"]
    assert r0["ranks"].equal(p0["ranks"]) and r1["ranks"].equal(p0["ranks"])
    for a, b in zip(r1["factors"], p0["factors"]): assert torch.equal(a, b)
    # one process with the same global batch (2 × 2 rows a step) ends where the two did: ranks, factors and losses
    one = train(TrainArgs(**SMALL, output_dir=str(tmp_path / "one")), progress=False)
    assert one["tuner"].ranks.equal(p0["ranks"])
    gap = max((a.detach() - b).abs().max().item() for a, b in zip(one["tuner"].parameters(), p0["factors"]))
    print(f"largest factor difference, one process against two: {gap:.2e}")
    assert gap <= 5e-5          # float32 sums in another order, grown by AdamW where gradients are tiny (measured 9e-6)
    assert one["losses"] == pytest.approx(p0["losses"], rel=1e-6)
    # one process summing the same two halves in the same order (grad_accum 2) ends where the two did, to 1e-6
    halves = train(TrainArgs(**{**SMALL, "batch_size": 2, "grad_accum": 2}, output_dir=str(tmp_path / "halves")),
                   progress=False)
    assert halves["tuner"].ranks.equal(p0["ranks"])
    tight = max((a.detach() - b).abs().max().item() for a, b in zip(halves["tuner"].parameters(), p0["factors"]))
    print(f"largest factor difference, one process summing the halves against two: {tight:.2e}")
    assert tight <= 1e-6
    # step 1's loss is the token mean over both processes' rows, not the mean of their two means
    args = TrainArgs(**{**SMALL, "batch_size": 2}).resolved()
    model, tok = load_model_and_tokenizer("embedded")
    data = SFTDataset(T.embedded_rows(limit=32), tok, max_length=args.max_length)
    with torch.no_grad():
        shards = [next(step_batches(data, args, r, 2, 0)) for r in (0, 1)]
        means = [model(**b).loss.item() for b in shards]
    tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in shards]
    assert tokens[0] != tokens[1]                                       # so the two weightings differ
    assert p0["losses"][0] == pytest.approx(sum(m * n for m, n in zip(means, tokens)) / sum(tokens), rel=1e-5)
    assert p0["losses"][0] != pytest.approx(sum(means) / 2, rel=1e-5)


# ---------------------------------------------------------------- 3. resuming exactly
@pytest.mark.parametrize("stop", [3, 4, 5])
def test_cli_resume_around_a_cycle_replays_the_run(cli_run, tmp_path, stop):
    out, _ = cli_run
    main(["train", *SMALL_FLAGS, "--resume", str(out / f"checkpoint-{stop}"), "--output-dir", str(tmp_path)])
    full, resumed = _metrics(out), _metrics(tmp_path)
    assert resumed["losses"] == full["losses"] and resumed["ranks"] == full["ranks"]
    assert resumed["cycles"] == full["cycles"]


KILLER = textwrap.dedent('''
    "`epng train` that is killed (SIGKILL) while it writes trainer.safetensors of checkpoint-6."
    import os, signal, sys, epng.cli, epng.io
    real_save = epng.io.save_file
    def save(tensors, f, *a, **k):
        if ".checkpoint-6.tmp" in str(f) and str(f).endswith("trainer.safetensors"):
            open(f, "wb").write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(tensors, f, *a, **k)
    epng.io.save_file = save
    epng.cli.main(sys.argv[1:])
''')


def test_killed_run_leaves_complete_checkpoints_and_resumes_latest(cli_run, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "killer.py").write_text(KILLER)
    done = subprocess.run([sys.executable, str(tmp_path / "killer.py"), "train", *SMALL_FLAGS, "--save-steps", "1",
                           "--output-dir", str(out)], capture_output=True, text=True, env=_env(), timeout=240)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    # every checkpoint folder is complete, the one being written is absent (only its hidden temp folder is left)
    names = sorted(p.name for p in out.glob("checkpoint-*"))
    assert names == [f"checkpoint-{k}" for k in range(1, 6)] and all(_complete(out / n) for n in names)
    assert list(out.glob(".checkpoint-6.tmp-*")) and not (out / "metrics.json").exists()
    assert latest_checkpoint(out) == out / "checkpoint-5"
    main(["train", *SMALL_FLAGS, "--save-steps", "1", "--output-dir", str(out), "--resume", "latest"])
    assert not list(out.glob(".*"))                    # the killed run's temp folder was removed at the start
    full, resumed = _metrics(cli_run[0]), _metrics(out)
    assert resumed["losses"] == full["losses"] and resumed["ranks"] == full["ranks"]
    assert all(_complete(checkpoint_dir(out, k)) for k in range(1, 11))


# ---------------------------------------------------------------- 4. Trainer and SFTTrainer
def _tiny_handle():
    torch.manual_seed(0)
    model, tok = T.load_model_and_tokenizer("embedded")
    cfg = epng.EPnGConfig(rank=4, lora_alpha=8, warmup_steps=4, cycle_interval=4)
    return tok, model, epng.attach(model, cfg)


def _check_callback_run(trainer, h, callback):
    assert [r.step for r in callback.controller.history] == [4, 8]            # 12 steps: none after the last
    assert int(h.ranks.sum()) == h.budget == 4 * 16 * 4
    assert int(h.ranks.max()) > 4 and int(h.ranks.min()) == 0                 # pruned and grown
    live = {id(p) for p in h.parameters()}
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == live
    assert h.optimizer is not None and {id(p) for g in h.optimizer.param_groups for p in g["params"]} == live
    # grown factors are larger than at attach and carry the Trainer's Adam state
    assert all(trainer.optimizer.state[p]["exp_avg"].shape == p.shape for p in h.parameters())
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 12 and all(math.isfinite(l) for l in losses)


def test_trainer_callback_edits_the_trainers_optimizer(tmp_path):
    from transformers import Trainer, TrainingArguments
    tok, model, h = _tiny_handle()
    data = SFTDataset(embedded_dataset(limit=48), tok, max_length=128)
    callback = epng.EPnGCallback(h, "epng")
    args = TrainingArguments(str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=3e-3,
                             logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no",
                             disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback],
                      data_collator=lambda rows: epng.collate(rows, data.pad_id))
    trainer.train()
    _check_callback_run(trainer, h, callback)


def test_sft_trainer_callback(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    tok, model, h = _tiny_handle()
    rows = embedded_dataset(limit=48)
    data = Dataset.from_dict({"prompt": [p for p, _ in rows], "completion": [r for _, r in rows]})
    callback = epng.EPnGCallback(h, "epng")
    # packing off and a max_length that fits the byte tokenizer's long sequences; no eval, no hub, no chat template
    args = trl.SFTConfig(str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=3e-3,
                         logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True,
                         packing=False, max_length=256, dataset_num_proc=None)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[callback])
    trainer.train()
    _check_callback_run(trainer, h, callback)


# ---------------------------------------------------------------- 5. bad input
def test_dataset_missing_fields_or_empty(tmp_path):
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    with pytest.raises(epng.EPnGError, match=r"no dataset format fits the fields \['answer', 'question'\].*query"):
        train(TrainArgs(**SMALL, dataset=str(wrong), output_dir=str(tmp_path / "a")), progress=False)
    half = tmp_path / "half.jsonl"
    half.write_text(json.dumps({"query": "1+1?", "response": "2"}) + "\n" + json.dumps({"query": "2+2?"}) + "\n")
    with pytest.raises(epng.EPnGError, match=r"row 1 lacks the field\(s\) \['response'\]"):
        train(TrainArgs(**SMALL, dataset=str(half), output_dir=str(tmp_path / "b")), progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(epng.EPnGError, match="has no rows"):
        train(TrainArgs(**SMALL, dataset=str(empty), output_dir=str(tmp_path / "c")), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_no_cycle_warning_when_max_steps_ends_before_warmup(tmp_path):
    with pytest.warns(UserWarning, match="no prune-and-grow cycle will run"):
        r = train(TrainArgs(**{**SMALL, "max_steps": 4}, output_dir=str(tmp_path)), progress=False)
    assert r["controller"].history == [] and r["tuner"].ranks.eq(8).all()
    with warnings.catch_warnings():                  # static LoRA has no cycles to miss
        warnings.simplefilter("error")
        train(TrainArgs(**{**SMALL, "max_steps": 2}, method="static", output_dir=str(tmp_path / "s")), progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = T.load_model_and_tokenizer
    def poisoned(*a, **k):                           # the loss of the 6th forward (step 6) becomes NaN
        model, tok = real(*a, **k)
        calls = {"n": 0}
        def hook(module, args, output):
            calls["n"] += 1
            if calls["n"] == 6: output.loss = output.loss * float("nan")
            return output
        model.register_forward_hook(hook)
        return model, tok
    monkeypatch.setattr(T, "load_model_and_tokenizer", poisoned)
    with pytest.raises(epng.EPnGError, match=r"the loss is nan at step 6.*lower lr.*checkpoint-5"):
        train(TrainArgs(**SMALL, save_steps=1, output_dir=str(tmp_path)), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint-{k}" for k in range(1, 6)]
    last = tmp_path / "checkpoint-5"
    assert _complete(last) and load_state(last, "trainer")["step"] == 5
    fresh, _ = real("embedded")
    h = epng.load_adapter(fresh, last / "adapter")
    assert all(torch.isfinite(p).all() for p in h.parameters()) and int(h.ranks.sum()) == h.budget


def test_nan_statistics_name_the_step(tiny):
    h = epng.attach(tiny(), epng.EPnGConfig(warmup_steps=2, cycle_interval=2))
    controller = EPnGController(h, "epng", max_steps=10)
    h.importance.sums[0, 3] = float("nan")
    assert controller.step_end(3) is None            # no cycle, no check
    with pytest.raises(NonFiniteStatisticsError, match="at step 4") as e:
        controller.step_end(4)
    assert isinstance(e.value, epng.EPnGError) and h.ranks.eq(8).all()   # nothing was pruned or grown


def test_resume_into_other_settings_is_refused(cli_run, tmp_path):
    ckpt = str(cli_run[0] / "checkpoint-4")
    for change, word in [(dict(rank=4), "rank: 8 → 4"), (dict(method="static"), "method: 'epng' → 'static'"),
                         (dict(method="esft", esft_batches=1), "method"), (dict(seed=1), "seed"),
                         (dict(prune_ratio=0.3), "prune_ratio: 0.2 → 0.3")]:
        with pytest.raises(epng.EPnGError, match="cannot resume") as e:
            train(TrainArgs(**{**SMALL, **change}, resume=ckpt, output_dir=str(tmp_path)), progress=False)
        assert word in str(e.value) and "Resume with the saved settings" in str(e.value)
    # another model: a saved copy of the embedded model with fewer experts
    model, tok = load_model_and_tokenizer("embedded")
    other = T.AutoModelForCausalLM.from_config(
        epng.tiny_moe_config("olmoe", vocab_size=len(tok), num_hidden_layers=4, num_experts=8, hidden_size=64,
                             intermediate_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    other.save_pretrained(tmp_path / "other"); tok.save_pretrained(tmp_path / "other")
    with pytest.raises(epng.EPnGError, match="model: 'embedded' →"):
        train(TrainArgs(**SMALL, model=str(tmp_path / "other"), resume=ckpt, output_dir=str(tmp_path)), progress=False)
    with pytest.raises(epng.EPnGError, match="not a complete epng checkpoint"):
        train(TrainArgs(**SMALL, resume=str(tmp_path / "other"), output_dir=str(tmp_path)), progress=False)
    with pytest.raises(epng.EPnGError, match="holds no complete checkpoint"):
        train(TrainArgs(**SMALL, resume="latest", output_dir=str(tmp_path / "empty")), progress=False)


def test_gradient_checkpointing_uses_the_api_transformers_keeps(tmp_path):
    short = {**SMALL, "max_steps": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)   # transformers 5.x: gradient_checkpointing_enable is deprecated
        on = train(TrainArgs(**short, gradient_checkpointing=True, output_dir=str(tmp_path / "on")), progress=False)
    off = train(TrainArgs(**short, output_dir=str(tmp_path / "off")), progress=False)
    def checkpointing(model):                          # the property's name follows the method's
        return getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert checkpointing(on["model"]) and not checkpointing(off["model"])
    assert on["losses"] == off["losses"]              # recomputed activations are the same ones


def test_unknown_method(capsys):
    with pytest.raises(epng.EPnGError, match=r"unknown method 'lora': choose one of \['static', .*'fft'\]"):
        TrainArgs(method="lora").resolved()
    with pytest.raises(epng.EPnGError, match="unknown method 'lora'"):
        train(TrainArgs(method="lora"), progress=False)
    with pytest.raises(SystemExit) as e:
        main(["train", "--method", "lora"])
    assert e.value.code == 2
    assert "argument --method: invalid choice: 'lora'" in capsys.readouterr().err


# ---------------------------------------------------------------- 6. every method
def test_methods_share_and_budget(tmp_path):
    runs = {m: train(TrainArgs(**{**SMALL, "max_steps": 5}, method=m, esft_batches=2,
                               output_dir=str(tmp_path / m)), progress=False) for m in epng.METHODS}
    for m, r in runs.items():
        assert 0 < r["share"] <= 1 and all(math.isfinite(l) for l in r["losses"]) and len(r["losses"]) == 5, m
        assert _metrics(tmp_path / m)["trainable_share"] == r["share"]
    budget = 4 * 16 * 8
    sums = {m: int(runs[m]["tuner"].ranks.sum()) for m in epng.loop.LORA_METHODS}
    assert sums["static"] == sums["epng"] == budget and sums["prune_only"] < budget < sums["grow_only"]
    assert runs["static"]["share"] == runs["epng"]["share"]
    assert runs["prune_only"]["share"] < runs["epng"]["share"] < runs["grow_only"]["share"]
    assert runs["esft"]["share"] < runs["fft"]["share"] == 1.0
    # ESFT changed only the selected experts' weights
    esft = runs["esft"]["tuner"]
    merged, (base, _) = esft.merged_model(), load_model_and_tokenizer("embedded")
    theirs = dict(base.named_parameters())
    changed = torch.zeros_like(esft.selected)
    for name, p in merged.named_parameters():
        if ".experts." in name:
            l = next(layer.index for layer in find_moe_layers(merged) if name.startswith(layer.name + "."))
            changed[l] |= (p - theirs[name]).flatten(1).abs().amax(1) > 0
        else: assert torch.equal(p, theirs[name]), name
    assert changed.equal(esft.selected) and 0 < int(esft.selected.sum()) < esft.selected.numel()


def test_a_checkpoint_written_before_the_knob_rename_resumes(cli_run, tmp_path):
    "A run started before 0.2 saved alpha, beta, interval, decay in args.json: its checkpoints still resume."
    from epng.compat import RENAMED_KNOBS
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(cli_run[0] / "checkpoint-4", ckpt)
    saved = json.loads((ckpt / "args.json").read_text())
    old = {new: old for old, new in RENAMED_KNOBS.items()}
    (ckpt / "args.json").write_text(json.dumps({old.get(k, k): v for k, v in saved.items()}))
    args = TrainArgs(**SMALL, output_dir=str(tmp_path)).resolved()
    assert T.inspect_checkpoint(ckpt, args)["state"]["step"] == 4
    (ckpt / "args.json").write_text(json.dumps({**saved, "alpha": 0.3}))        # both names: which one holds?
    with pytest.raises(T.DamagedCheckpointError, match="give only 'prune_ratio'"): T.inspect_checkpoint(ckpt, args)


def test_a_checkpoint_from_before_the_dmep_options_resumes(tmp_path):
    "args.json without thresholds and router_aux_loss (written before they existed) resumes with what it ran with."
    settings = dict(max_steps=6, warmup_steps=2, cycle_interval=2, limit=16, batch_size=4)
    full = train(TrainArgs(**settings, save_steps=3, output_dir=str(tmp_path / "run")), progress=False)
    saved = tmp_path / "run" / "checkpoint-3" / "args.json"
    old = {k: v for k, v in json.loads(saved.read_text()).items() if k not in ("thresholds", "router_aux_loss")}
    saved.write_text(json.dumps(old))
    resumed = train(TrainArgs(**settings, output_dir=str(tmp_path / "resumed"), resume=str(saved.parent)), progress=False)
    assert resumed["losses"] == full["losses"]
    with pytest.raises(epng.EPnGError, match="thresholds: 'global' → 'layer'"):
        train(TrainArgs(**settings, thresholds="layer", output_dir=str(tmp_path / "other"), resume=str(saved.parent)),
              progress=False)
