"""`epng train --fsdp` checkpoints: each process writes its own rows through torch.distributed.checkpoint, and reading
them back checks that the files cover every tensor exactly once, before and after anything is read."""
import json, os, shutil, socket, subprocess, sys
from pathlib import Path
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from epng.io import load_state, save_state
from epng.train import DamagedCheckpointError, TrainArgs, inspect_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(max_steps=4, warmup_steps=2, cycle_interval=2, limit=16, rank=4, batch_size=2, fsdp=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    "A 4-step `epng train --fsdp` on two CPU processes, a checkpoint after steps 2 and 4 (cycles at both)."
    out = tmp_path_factory.mktemp("sharded") / "run"
    flags = ["--max-steps", "4", "--warmup-steps", "2", "--cycle-interval", "2", "--limit", "16", "--rank", "4",
             "--batch-size", "2", "--fsdp", "--save-steps", "2", "--output-dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), "-m", "epng.cli", "train", *flags], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _pieces(folder: Path) -> dict:
    "{name: [(offsets, tensor)]} read straight from the shard files' headers and data, one entry per file."
    found = {}
    for f in sorted((folder / "sharded").glob("*.safetensors")):
        with safe_open(f, framework="pt") as s:
            offsets = json.loads(s.metadata()["DCP_SHARDING_INFO"])
            for name in s.keys(): found.setdefault(name, []).append((offsets[name]["saved_offsets"], s.get_tensor(name)))
    return found


def _whole(pieces: list) -> torch.Tensor:
    "A tensor put together from its row pieces."
    return torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])])


def _args(tmp_path: Path, resume) -> TrainArgs:
    return TrainArgs(**SETTINGS, output_dir=str(tmp_path / "resumed"), resume=str(resume)).resolved()


def test_each_process_writes_its_own_rows_and_nothing_is_gathered(run):
    "Two files, each with half the rows of every factor pool and moment; no adapter, no moment in trainer.json."
    ck = run / "checkpoint-2"
    assert sorted(p.name for p in ck.iterdir()) == ["args.json", "sharded", "slots.json", "slots.safetensors",
                                                   "trainer.json", "trainer.safetensors"]
    pieces = _pieces(ck)
    assert len(list((ck / "sharded").glob("*.safetensors"))) == 2
    assert {n.split(".")[0] for n in pieces} == {"factor", "exp_avg", "exp_avg_sq"}
    for name, parts in pieces.items():
        rows = sorted((o[0], t.shape[0]) for o, t in parts)
        total = sum(n for _, n in rows)
        assert len(parts) == 2 and rows[0] == (0, -(-total // 2)) and rows[1][0] == rows[0][1], (name, rows)
    state = load_state(ck, "trainer")["optimizer"]["state"]
    assert state and all(set(s) == {"step"} for s in state.values())


def test_one_process_reads_every_row_back(run, tmp_path):
    "Resuming the last sharded checkpoint in one process gives the two processes' adapter and moments exactly."
    resumed = train(_args(tmp_path, run / "checkpoint-4"), progress=False)
    assert resumed["world"] == 1 and resumed["losses"] == json.loads((run / "metrics.json").read_text())["losses"]
    ours, theirs = (load_file(p / "adapter" / "epng_adapter.safetensors") for p in (tmp_path / "resumed", run))
    assert ours.keys() == theirs.keys()
    for name in ours: assert torch.equal(ours[name], theirs[name]), name
    saved = load_state(tmp_path / "resumed" / "checkpoint-4", "trainer")["optimizer"]["state"]   # written whole now
    pieces = _pieces(run / "checkpoint-4")
    for i, st in saved.items():
        for k in ("exp_avg", "exp_avg_sq"): assert torch.equal(st[k], _whole(pieces[f"{k}.{i}"])), (k, i)


def _copy(run: Path, tmp_path: Path) -> Path:
    ck = tmp_path / "checkpoint-4"
    shutil.copytree(run / "checkpoint-4", ck)
    return ck


def test_a_missing_or_planted_shard_file_is_refused_before_reading(run, tmp_path):
    "A lost file leaves rows unread, a planted copy reads them twice: both are refused at inspection."
    ck = _copy(run, tmp_path)
    first, second = sorted((ck / "sharded").glob("*.safetensors"))
    shutil.copy(first, ck / "sharded" / "planted.safetensors")
    with pytest.raises(DamagedCheckpointError, match="exactly once"): inspect_checkpoint(ck, _args(tmp_path, ck))
    (ck / "sharded" / "planted.safetensors").unlink(); first.unlink()
    with pytest.raises(DamagedCheckpointError, match="exactly once"): inspect_checkpoint(ck, _args(tmp_path, ck))
    second.unlink()
    with pytest.raises(DamagedCheckpointError, match="0 shard files"): inspect_checkpoint(ck, _args(tmp_path, ck))


def test_non_finite_rows_are_refused_after_reading(run, tmp_path):
    "A NaN in one process's rows of a moment: the resume stops with the tensor named, and writes nothing."
    ck = _copy(run, tmp_path)
    f = sorted((ck / "sharded").glob("*.safetensors"))[1]
    with safe_open(f, framework="pt") as s: header = s.metadata()
    tensors = load_file(f)
    tensors["exp_avg_sq.0"][0, 0] = float("nan")
    save_file(tensors, f, metadata=header)
    with pytest.raises(DamagedCheckpointError, match="exp_avg_sq of parameter 0 holds 1 non-finite"):
        train(_args(tmp_path, ck), progress=False)
    assert not (tmp_path / "resumed" / "adapter").exists()


def test_slot_owners_that_do_not_fit_are_refused(run, tmp_path):
    "Slots with another budget, or owners that disagree with the ranks, are refused before the factors are read."
    ck = _copy(run, tmp_path)
    slots = load_state(ck, "slots")
    save_state({**slots, "budget": slots["budget"] + 1}, ck, "slots")
    with pytest.raises(DamagedCheckpointError, match="budget"): train(_args(tmp_path, ck), progress=False)
    owner = slots["slot_owner"].clone(); owner[0, owner[0] >= 0] = 0      # every live slot of layer 0 to expert 0
    save_state({**slots, "slot_owner": owner}, ck, "slots")
    with pytest.raises(DamagedCheckpointError, match="slot owners"): train(_args(tmp_path, ck), progress=False)


def test_accelerate_launch_with_fsdp2_shards(tmp_path):
    "`accelerate launch --use_fsdp --fsdp_version 2` alone (no --fsdp) makes epng train shard: its checkpoint is by rows."
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines",
                           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                           str(_free_port()), "--use_fsdp", "--fsdp_version", "2", "-m", "epng.cli", "train",
                           "--max-steps", "2", "--limit", "8", "--rank", "4", "--batch-size", "2", "--save-steps", "1",
                           "--output-dir", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "checkpoint-1" / "args.json").read_text())["fsdp"] is True
    assert len(list((tmp_path / "run" / "checkpoint-1" / "sharded").glob("*.safetensors"))) == 2
