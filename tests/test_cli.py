"The command line (issue 14 §4–5): a folder per run, stopping with a checkpoint and continuing exactly, a fast help."
import json, os, re, shlex, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file
import epng
from epng.cli import main
from epng.train import TrainArgs, train, load_model_and_tokenizer

T = sys.modules["epng.train"]    # the module: `epng.train` is the function
ROOT = Path(__file__).resolve().parents[1]
# 10 steps, a cycle after steps 4 and 8, 32 rows in batches of 4 (as in test_train.py)
SMALL_FLAGS = ["--max-steps", "10", "--warmup-steps", "4", "--cycle-interval", "4", "--limit", "32", "--batch-size", "4"]
TINY_FLAGS = ["--max-steps", "2", "--limit", "16", "--batch-size", "4", "--esft-batches", "1"]


def _env() -> dict:
    "The test's environment for subprocesses, with as many threads as here so that floats agree bit for bit."
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads()),
            "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}


def _metrics(out) -> dict: return json.loads((Path(out) / "metrics.json").read_text())


def _no_model(monkeypatch):
    "Loading a model fails the test: the error had to come before it."
    def load(*a, **k): raise AssertionError("the model was loaded before the error")
    monkeypatch.setattr(T, "load_model_and_tokenizer", load)


# ---------------------------------------------------------------- 1. a folder per run
def test_runs_without_output_dir_get_folders_of_their_own(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for method in ["static", "esft", "static"]: main(["train", *TINY_FLAGS, "--method", method])
    runs = sorted((tmp_path / "outputs").iterdir())
    assert [re.fullmatch(r"(static|esft)-\d{8}-\d{6}(-\d+)?", p.name)[1] for p in runs] == ["esft", "static", "static"]
    stdout = capsys.readouterr().out
    for run in runs:                                   # each holds its own run's files, and nothing else
        method = run.name.split("-")[0]
        assert _metrics(run)["method"] == method and f"metrics    saved in outputs/{run.name}/metrics.json" in stdout
        assert sorted(p.name for p in run.iterdir()) == sorted(
            ["checkpoint-2", "figures", "metrics.json"] + (["adapter"] if method == "static" else []))


def test_a_used_output_dir_is_refused_unless_resumed_or_overwritten(tmp_path, monkeypatch, capsys):
    used = tmp_path / "run"
    (used / "checkpoint-7").mkdir(parents=True); (used / "notes.txt").write_text("mine")
    _no_model(monkeypatch)
    with pytest.raises(SystemExit) as e: main(["train", "--output-dir", str(used)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"output_dir {used} is not empty (checkpoint-7, notes.txt)" in err
    assert "--resume latest" in err and "--overwrite" in err and "Traceback" not in err
    # --resume latest needs the run's folder: the message names the newest run here
    monkeypatch.chdir(tmp_path)
    for name in ["epng-20261130-101010", "epng-20261130-111111", "static-20261130-121212"]:
        (tmp_path / "outputs" / name).mkdir(parents=True)
    with pytest.raises(SystemExit) as e: main(["train", "--resume", "latest"])
    assert e.value.code == 2
    assert "e.g. --output-dir outputs/epng-20261130-111111 --resume latest" in capsys.readouterr().err
    # --overwrite deletes the previous run's files (not the others) and trains
    monkeypatch.undo()
    main(["train", *TINY_FLAGS, "--output-dir", str(used), "--overwrite"])
    assert sorted(p.name for p in used.iterdir()) == ["adapter", "checkpoint-2", "figures", "metrics.json", "notes.txt"]


def test_a_folder_holding_the_nano_model_takes_the_embedded_preset(tmp_path, capsys):
    model, tok = load_model_and_tokenizer("embedded")
    folder = tmp_path / "my nano"
    model.save_pretrained(folder); tok.save_pretrained(folder)
    r = train(TrainArgs(model=str(folder), max_steps=1, batch_size=4, limit=8, output_dir=str(tmp_path / "run")))
    assert (r["args"].bf16, r["args"].lr, r["args"].warmup_steps) == (False, 3e-3, 30)
    assert (f"preset 'embedded' ({folder} holds a model of the nano OLMoE's shape): max_steps 1 (given; preset 120), "
            "batch_size 4 (given; preset 8), lr 0.003, warmup_steps 30, cycle_interval 15, max_length 256, bf16 False"
            ) in capsys.readouterr().err


# ---------------------------------------------------------------- 2. stopping and continuing
STOPPER = textwrap.dedent('''
    "`epng train` that says when its third training step runs, and lets it take 2 s: time for a signal to arrive."
    import sys, time, torch, epng.cli
    forwards = []
    def pause(module, args, output):
        if module.training and type(module).__name__ == "OlmoeForCausalLM":
            forwards.append(1)
            if len(forwards) == 3: print("in step 3", flush=True); time.sleep(2)
    torch.nn.modules.module.register_module_forward_hook(pause)
    epng.cli.main(sys.argv[1:])
''')


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "full"
    main(["train", *SMALL_FLAGS, "--output-dir", str(out)])
    return out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_the_printed_command_continues_exactly(uninterrupted, tmp_path, signum):
    (tmp_path / "stopper.py").write_text(STOPPER)
    out = tmp_path / "run"
    # --overwrite (which the command to continue leaves out) is one of the settings a resume may change
    child = subprocess.Popen([sys.executable, str(tmp_path / "stopper.py"), "train", *SMALL_FLAGS, "--output-dir",
                              str(out), "--overwrite"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env(), cwd=ROOT)
    try:
        assert child.stdout.readline() == "in step 3\n"
        child.send_signal(signum)
        _, stderr = child.communicate(timeout=240)
    finally: child.kill()
    name = signal.Signals(signum).name
    assert child.returncode == 128 + signum and "Traceback" not in stderr, stderr[-3000:]
    message = stderr.strip().splitlines()[-1]
    assert message.startswith(f"epng train: stopped by {name} after step 3 of 10, saved in {out / 'checkpoint-3'}; "
                              "continue exactly with: epng train "), message
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3"]
    command = shlex.split(message.split("continue exactly with: ")[1])
    assert command[-4:] == ["--output-dir", str(out), "--resume", "latest"]
    main(command[1:])                                  # the command as printed (`epng` is main)
    full, resumed = _metrics(uninterrupted), _metrics(out)
    assert resumed["losses"] == full["losses"] and resumed["ranks"] == full["ranks"]
    ours, theirs = (load_file(o / "adapter" / "epng_adapter.safetensors") for o in (out, uninterrupted))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


STOP_ONE = textwrap.dedent('''
    "`epng train` in several processes, of which the second sends itself SIGTERM during step 3."
    import os, signal, sys, torch, epng.cli
    forwards = []
    def stop(module, args, output):
        if module.training and type(module).__name__ == "OlmoeForCausalLM" and os.environ["RANK"] == "1":
            forwards.append(1)
            if len(forwards) == 3: signal.raise_signal(signal.SIGTERM)
    torch.nn.modules.module.register_module_forward_hook(stop)
    epng.cli.main(sys.argv[1:])
''')


def test_a_signal_to_one_process_stops_all_after_the_same_step(tmp_path):
    (tmp_path / "stop_one.py").write_text(STOP_ONE)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29733",
           str(tmp_path / "stop_one.py"), "train", *SMALL_FLAGS[:-2], "--batch-size", "2", "--output-dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert done.returncode != 0 and done.stderr.count("epng train: stopped by SIGTERM after step 3 of 10") == 1, \
        done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3"]
    args = TrainArgs(max_steps=10, warmup_steps=4, cycle_interval=4, limit=32, batch_size=2, output_dir=str(out)).resolved()
    assert T.inspect_checkpoint(out / "checkpoint-3", args)["state"]["step"] == 3


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path):
    (tmp_path / "stopper.py").write_text(STOPPER)
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, str(tmp_path / "stopper.py"), "train", *SMALL_FLAGS, "--output-dir",
                              str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    try:
        assert child.stdout.readline() == "in step 3\n"
        child.send_signal(signal.SIGINT)
        time.sleep(0.5)                                # the first one is handled during the step's 2 s
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=240)
    finally: child.kill()
    assert child.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert "SIGINT: stopping after this step, with a checkpoint (send it again to stop at once" in stderr
    assert stderr.strip().splitlines()[-1] == "epng train: interrupted; nothing saved after the last checkpoint."
    assert not out.exists() or not list(out.glob("checkpoint-*"))


def test_train_gives_back_the_signal_handlers_it_found(tmp_path):
    def mine(signum, frame): pass
    before = signal.signal(signal.SIGTERM, mine)
    try:
        train(TrainArgs(max_steps=1, batch_size=4, limit=8, output_dir=str(tmp_path)), progress=False)
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally: signal.signal(signal.SIGTERM, before)


# ---------------------------------------------------------------- 3. the help answers without torch
HELP = textwrap.dedent('''
    "Ask `epng --help` and `epng train --help`; print the heavy modules imported on the way."
    import importlib.util, sys, types
    if sys.argv[1] == "bare":   # without running epng/__init__.py: what epng.cli itself imports
        package = types.ModuleType("epng")
        package.__path__ = list(importlib.util.find_spec("epng").submodule_search_locations)
        sys.modules["epng"] = package
    from epng.cli import main
    for argv in (["--help"], ["train", "--help"]):
        try: main(argv)
        except SystemExit as e: assert e.code == 0, e.code
    print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
''')


def _help_imports(how: str) -> str:
    done = subprocess.run([sys.executable, "-c", HELP, how], capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    squeezed = "".join(done.stdout.split())           # argparse wraps lines to the terminal's width
    for said in ["usage: epng train", "--warmup-steps", "T_w: plain-LoRA steps before the first prune-and-grow cycle",
                 "(preset: paper 100 / embedded 30)", "λ: factor the importance statistics are multiplied by"]:
        assert "".join(said.split()) in squeezed, said
    return done.stdout.strip().splitlines()[-1]


def test_cli_module_help_imports_no_torch():
    assert _help_imports("bare") == "[]"


def test_epng_help_imports_no_torch():
    assert _help_imports("package") == "[]"


def test_the_importance_reading_reaches_the_handle():
    "--importance is one switch: TrainArgs → EPnGConfig → the handle's collector (notebook 04's readings)."
    assert TrainArgs(importance="selection").resolved().epng_config().importance == "selection"
    with pytest.raises(epng.EPnGError, match="importance must be one of"):
        TrainArgs(importance="token").resolved()
