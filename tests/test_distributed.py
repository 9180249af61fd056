"Two CPU processes: Trainer + EPnGCallback under DistributedDataParallel, and FSDP2 sharding the factors by rows."
import json, os, socket, subprocess, sys, textwrap
import pytest
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent('''
    "One Trainer run of EPnG on the nano model; each process saves its ranks and factors."
    import sys, torch
    from transformers import Trainer, TrainingArguments
    import epng
    from epng.nano import load_nano
    from epng.loop import EPnGCallback
    torch.set_num_threads(1)
    out, world = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model, _ = load_nano()
    handle = epng.attach(model, epng.EPnGConfig(rank=4, warmup_steps=2, cycle_interval=2))
    rows = torch.randint(3, 200, (32, 16), generator=torch.Generator().manual_seed(7))
    data = [{"input_ids": x, "labels": x} for x in rows]
    args = TrainingArguments(output_dir=f"{out}/trainer{world}", use_cpu=True, max_steps=7, learning_rate=3e-3,
                             per_device_train_batch_size=4 // world, lr_scheduler_type="constant", weight_decay=0.01,
                             report_to="none", save_strategy="no", seed=0, dataloader_drop_last=True,
                             disable_tqdm=True, ddp_find_unused_parameters=False)
    callback = EPnGCallback(handle, "epng")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    params = list(handle.parameters())
    trainer.train()
    torch.save({"ranks": handle.ranks, "factors": [p.detach().clone() for p in handle.parameters()],
                "same_parameters": all(p is q for p, q in zip(handle.parameters(), params)),
                "wrapped": type(trainer.model_wrapped).__name__, "cycles": len(callback.controller.history)},
               f"{out}/world{world}-process{args.process_index}.pt")
''')


FSDP_PROBE = textwrap.dedent('''
    "EPnG's own loop on the nano model: one process, or two under torchrun with FSDP2's fully_shard."
    import sys, torch, torch.distributed as dist
    import epng
    from epng.nano import load_nano
    from epng.loop import EPnGController
    torch.set_num_threads(1)
    out, world = sys.argv[1], int(sys.argv[2])
    if world > 1: dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    model, _ = load_nano()
    handle = epng.attach(model, epng.EPnGConfig(rank=4, warmup_steps=2, cycle_interval=2))
    if world > 1:                                # every decoder layer, then the rest: the factors are sharded by rows
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers: fully_shard(layer)
        fully_shard(model)
    params = list(handle.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    handle.bind_optimizer(optimizer)
    controller = EPnGController(handle, "epng", max_steps=8, seed=0)
    rows = torch.randint(3, 200, (32, 16), generator=torch.Generator().manual_seed(7))
    model.train()
    for step in range(1, 9):
        mine = rows[(step - 1) * 4:step * 4][rank * (4 // world):(rank + 1) * (4 // world)]
        model(input_ids=mine, labels=mine).loss.backward()    # equal lengths: the mean of means is the global mean
        optimizer.step(); optimizer.zero_grad()
        controller.step_end(step, optimizer)                  # prune and grow on the sharded rows
    torch.save({"ranks": handle.ranks, "cycles": len(controller.history), "kind": type(params[0]).__name__,
                "factors": [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in params],
                "same_parameters": all(p is q for p, q in zip(handle.parameters(), params))},
               f"{out}/world{world}-process{rank}.pt")
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def test_trainer_under_ddp_matches_one_process(tmp_path):
    "Two processes of 2 rows a step and one of 4 end with the same ranks; the factors agree to float32 noise."
    ref, p0, p1 = _run_both(tmp_path, PROBE)
    assert (ref["wrapped"], p0["wrapped"]) == ("OlmoeForCausalLM", "DistributedDataParallel")
    assert p0["cycles"] == ref["cycles"] == 3 and p0["same_parameters"] and p1["same_parameters"]
    assert not ref["ranks"].equal(torch.full_like(ref["ranks"], 4))          # the cycles moved ranks
    assert p0["ranks"].equal(ref["ranks"]) and p1["ranks"].equal(ref["ranks"])
    for a, b in zip(p0["factors"], p1["factors"]): assert torch.equal(a, b)   # DDP keeps the processes identical
    gap = max((a - b).abs().max().item() for a, b in zip(p0["factors"], ref["factors"]))
    assert gap <= 1e-4, gap      # float32 sums in another order, grown by AdamW (measured 1.8e-5)


def _run_both(tmp_path, probe: str) -> tuple[dict, dict, dict]:
    "The probe in one process, then in two under torchrun: what each saved."
    (tmp_path / "probe.py").write_text(probe)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    for cmd in ([sys.executable, "probe.py", str(tmp_path), "1"],
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                 str(_free_port()), "probe.py", str(tmp_path), "2"]):
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    return tuple(torch.load(tmp_path / f) for f in ("world1-process0.pt", "world2-process0.pt", "world2-process1.pt"))


def test_fsdp2_shards_the_factors_and_matches_one_process(tmp_path):
    "fully_shard on two CPU processes: prune and grow act on sharded rows; the run ends where one process does."
    ref, p0, p1 = _run_both(tmp_path, FSDP_PROBE)
    assert (ref["kind"], p0["kind"]) == ("Parameter", "DTensor") and p0["same_parameters"]
    assert p0["cycles"] == ref["cycles"] == 3
    assert not ref["ranks"].equal(torch.full_like(ref["ranks"], 4))
    assert p0["ranks"].equal(ref["ranks"]) and p1["ranks"].equal(ref["ranks"])
    for a, b in zip(p0["factors"], p1["factors"]): assert torch.equal(a, b)
    gap = max((a - b).abs().max().item() for a, b in zip(p0["factors"], ref["factors"]))
    assert gap <= 1e-4, gap      # float32 sums in another order, grown by AdamW (measured 1.3e-5)


def test_the_readme_memory_table_is_what_the_package_computes():
    "The README's per-GPU figures at 8 GPUs come from epng.memory; recomputed here from the configs on the meta device."
    import re
    from epng.memory import memory_per_gpu
    from epng.moe import offline_config
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (OLMoE-1B-7B-0125|Qwen1\.5-MoE-A2\.7B|Qwen3-30B-A3B) \| ([\d.]+) \| ([\d.]+) \|$", readme, re.M)
    assert len(rows) == 3
    ids = {"OLMoE-1B-7B-0125": "allenai/OLMoE-1B-7B-0125", "Qwen1.5-MoE-A2.7B": "Qwen/Qwen1.5-MoE-A2.7B",
           "Qwen3-30B-A3B": "Qwen/Qwen3-30B-A3B"}
    for name, ddp, fsdp in rows:
        config = offline_config(ids[name])
        for engine, shown in (("ddp", ddp), ("fsdp2", fsdp)):
            assert f"{memory_per_gpu(config, 8, engine)['total'] / 2**30:.2f}" == shown, (name, engine)


def test_epng_train_under_fsdp2_matches_one_process_and_resumes_exactly(tmp_path):
    "`epng train --fsdp` on two CPU processes: the ranks of one process, and a resume from step 5 replays the run."
    from safetensors.torch import load_file
    from epng.train import TrainArgs, train
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    flags = ["train", "--max-steps", "8", "--warmup-steps", "2", "--cycle-interval", "3", "--limit", "32", "--rank", "4",
             "--batch-size", "2", "--fsdp"]
    def launch(*extra):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                               str(_free_port()), "-m", "epng.cli", *flags, *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    launch("--save-steps", "5", "--output-dir", str(tmp_path / "run"))
    launch("--output-dir", str(tmp_path / "resumed"), "--resume", str(tmp_path / "run" / "checkpoint-5"))
    one = train(TrainArgs(max_steps=8, warmup_steps=2, cycle_interval=3, limit=32, rank=4, batch_size=4,
                          output_dir=str(tmp_path / "one")), progress=False)
    metrics = {k: json.loads((tmp_path / k / "metrics.json").read_text()) for k in ("run", "resumed", "one")}
    assert metrics["run"]["ranks"] == metrics["one"]["ranks"] == one["tuner"].ranks.tolist()
    assert len(metrics["run"]["cycles"]) == 2
    assert metrics["resumed"]["losses"] == metrics["run"]["losses"]                 # exactly
    assert metrics["run"]["losses"] == pytest.approx(metrics["one"]["losses"], rel=1e-5)
    run, resumed, single = (load_file(tmp_path / k / "adapter" / "epng_adapter.safetensors") for k in ("run", "resumed", "one"))
    for name, t in run.items():
        if name.startswith("importance."):   # a resumed process restarts from the mean: the same sum, added otherwise
            torch.testing.assert_close(resumed[name], t, rtol=1e-6, atol=0); continue
        assert torch.equal(resumed[name], t), name                                  # the resumed run is the run
        assert (t - single[name]).abs().max() <= 1e-4, name                         # float32 noise, AdamW-grown
    mean = lambda a: a["importance.sums"] / a["importance.counts"][:, None]         # saved: the mean over processes
    torch.testing.assert_close(mean(run), mean(single), rtol=1e-5, atol=1e-7)


def test_the_callback_refuses_engines_whose_optimizer_state_it_cannot_edit(monkeypatch):
    "DeepSpeed and FSDP version 1 flatten the optimizer state: pruned ranks would come back, so the Trainer is refused."
    from types import SimpleNamespace as Args
    import epng
    from epng.loop import EPnGCallback, unreachable_state
    from epng.nano import load_nano
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "FSDP_VERSION"): monkeypatch.delenv(var, raising=False)
    assert unreachable_state(Args(deepspeed="zero3.json")) == "DeepSpeed (ZeRO)"
    assert unreachable_state(Args(fsdp=True, fsdp_config={})) == "FSDP version 1"
    assert unreachable_state(Args(fsdp=True, fsdp_config={"version": 2})) is None
    assert unreachable_state(Args(fsdp=False, fsdp_config=None, deepspeed=None)) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")                   # accelerate launch with an FSDP config
    assert unreachable_state(Args()) == "FSDP version 1"
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert unreachable_state(Args()) is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    callback = EPnGCallback(epng.attach(load_nano()[0]))
    with pytest.raises(epng.EPnGError, match="cannot run under DeepSpeed"):
        callback.on_init_end(Args(), None, None)
