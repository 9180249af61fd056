"Two CPU processes: Trainer + EPnGCallback under DistributedDataParallel, FSDP2 and DeepSpeed ZeRO-3."
import json, os, socket, subprocess, sys, textwrap
import pytest
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent('''
    "One Trainer run of EPnG on the nano model under `engine`; each process saves its ranks and factors."
    import json, sys, torch
    import torch.distributed as dist
    from transformers import Trainer, TrainerCallback, TrainingArguments
    import epng
    from epng.nano import load_nano
    from epng.loop import EPnGCallback
    from epng.lora import whole
    torch.set_num_threads(1)
    out, world = sys.argv[1], int(sys.argv[2])
    engine = sys.argv[3] if len(sys.argv) > 3 else "ddp"
    torch.manual_seed(0)
    model, _ = load_nano()
    handle = epng.attach(model, epng.EPnGConfig(rank=4, warmup_steps=2, cycle_interval=2))
    rows = torch.randint(3, 200, (32, 16), generator=torch.Generator().manual_seed(7))
    data = [{"input_ids": x, "labels": x} for x in rows]
    extra = {"ddp_find_unused_parameters": False}
    if engine == "accumulate":                      # one process, the batch in the two halves two processes see
        extra["gradient_accumulation_steps"], world = 2, 2
    if engine in ("fsdp2", "zero3") and world > 1:  # accelerate 1.x starts FSDP and DeepSpeed only on accelerators; on
        import accelerate                           # CPUs it runs DDP: put its state in that engine's mode once built,
        from accelerate.utils import DistributedType   # as on GPUs; the rest is accelerate's own path
        init = accelerate.Accelerator.__init__
        def on_cpu(self, *a, fsdp_plugin=None, deepspeed_plugin=None, **k):
            init(self, *a, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **k)
            if self.state.distributed_type != DistributedType.MULTI_CPU: return
            if fsdp_plugin is not None:
                self.state.distributed_type, self.state.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            if deepspeed_plugin is not None:
                self.state.distributed_type, self.state.deepspeed_plugins = DistributedType.DEEPSPEED, deepspeed_plugin
                deepspeed_plugin.set_mixed_precision("no"); deepspeed_plugin.select(_from_accelerator_state=True)
        accelerate.Accelerator.__init__ = on_cpu
    if engine == "fsdp2" and world > 1:
        extra = {"fsdp": True,
                 "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["OlmoeDecoderLayer"]}}
    if engine == "zero3" and world > 1:            # the config 11_loop shows; the nano model's factors partitioned too
        config = ZERO3
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        with open("zero3.json", "w") as f: json.dump(config, f)
        extra = {"deepspeed": "zero3.json"}
        from deepspeed.utils import set_z3_leaf_modules   # as DeepSpeed advises for MoE blocks
        set_z3_leaf_modules(model, [type(handle.layers[0].experts)])
    args = TrainingArguments(output_dir=f"{out}/trainer{world}", use_cpu=True, max_steps=7, learning_rate=3e-3,
                             per_device_train_batch_size=4 // world, lr_scheduler_type="constant", weight_decay=0.01,
                             report_to="none", save_strategy="no", seed=0, dataloader_drop_last=True,
                             disable_tqdm=True, **extra)

    class FreeSlots(TrainerCallback):              # before EPnG's: after each step, are the slots freed earlier zero?
        zero = []
        def on_step_end(self, *a, **k):
            self.zero.append(all(float(whole(p).detach()[lora.slot_owner < 0].abs().sum()) == 0
                                 for lora in handle.loras for p in lora.parameters()))
    callback = EPnGCallback(handle, "epng")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[FreeSlots(), callback])
    params = list(handle.parameters())
    trainer.train()
    factors = list(handle.parameters())
    torch.save({"ranks": handle.ranks, "factors": [whole(p).detach().clone() for p in factors],
                "same_parameters": all(p is q for p, q in zip(factors, params)), "kind": type(factors[0]).__name__,
                "optimized": all(any(p is q for g in trainer.optimizer.param_groups for q in g["params"])
                                 for p in factors),
                "zero3": hasattr(factors[0], "ds_tensor") and factors[0].data.numel() == 0,   # partitioned
                "free_is_zero": FreeSlots.zero,
                "wrapped": type(trainer.model_wrapped).__name__, "cycles": len(callback.controller.history)},
               f"{out}/{engine}-world{world}-process{args.process_index}.pt")
    if dist.is_initialized(): dist.barrier(); dist.destroy_process_group()   # no process leaves its peers' threads behind
''').replace("ZERO3", repr({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"},
                           "fp16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
                           "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
                           "gradient_clipping": "auto", "zero_allow_untested_optimizer": True}))


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
    if world > 1: dist.barrier(); dist.destroy_process_group()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def test_trainer_under_ddp_matches_one_process(tmp_path):
    "Two processes of 2 rows a step and one of 4 end with the same ranks; the factors agree to float32 noise."
    ref, p0, p1 = _run_both(tmp_path, PROBE, "ddp")
    assert (ref["wrapped"], p0["wrapped"]) == ("OlmoeForCausalLM", "DistributedDataParallel")
    assert p0["cycles"] == ref["cycles"] == 3 and p0["same_parameters"] and p1["same_parameters"]
    assert all(p0["free_is_zero"]) and all(ref["free_is_zero"])              # freed slots stay zero
    assert not ref["ranks"].equal(torch.full_like(ref["ranks"], 4))          # the cycles moved ranks
    assert p0["ranks"].equal(ref["ranks"]) and p1["ranks"].equal(ref["ranks"])
    for a, b in zip(p0["factors"], p1["factors"]): assert torch.equal(a, b)   # DDP keeps the processes identical
    gap = max((a - b).abs().max().item() for a, b in zip(p0["factors"], ref["factors"]))
    assert gap <= 1e-4, gap      # float32 sums in another order, grown by AdamW (measured 1.8e-5)


def _run_both(tmp_path, probe: str, engine: str | None = None) -> tuple[dict, dict, dict]:
    "The probe in one process, then in two under torchrun: what each saved."
    (tmp_path / "probe.py").write_text(probe)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    tail = [engine] if engine else []
    for cmd in ([sys.executable, "probe.py", str(tmp_path), "1", *tail],
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                 str(_free_port()), "probe.py", str(tmp_path), "2", *tail]):
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    prefix = f"{engine}-" if engine else ""
    return tuple(torch.load(tmp_path / f"{prefix}{f}") for f in ("world1-process0.pt", "world2-process0.pt",
                                                                 "world2-process1.pt"))


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


def test_trainer_under_fsdp2_matches_one_process(tmp_path):
    """Trainer + EPnGCallback with `fsdp_config={"fsdp_version": 2}` on two CPU processes: the Trainer's optimizer holds
    the row-sharded factors, and the run ends with the ranks of one process. accelerate 1.x keeps FSDP for accelerators
    (`AcceleratorState` sets DistributedType.FSDP only for MULTI_GPU, MULTI_XPU, ...; on CPUs the Trainer silently runs
    DDP), so the probe puts accelerate's state in FSDP mode after it is built; from there it is accelerate's own FSDP2
    path (`fully_shard` of every decoder layer, the optimizer built after sharding). The factors match a one-process
    run of the same 4-row batch only to 1e-4: it sums the batch in another order, and AdamW divides each step by
    sqrt(v), which blows float32 noise up where gradients are tiny (measured 1.8e-5, as under DDP). A one-process run
    that sums the same two halves (gradient accumulation over 2 rows twice) is the same arithmetic, and matches to 1e-6
    (measured 7.5e-9)."""
    ref, p0, p1 = _run_both(tmp_path, PROBE, "fsdp2")
    assert (ref["wrapped"], p0["wrapped"]) == ("OlmoeForCausalLM", "FSDPOlmoeForCausalLM")
    assert p0["kind"] == "DTensor" and p0["optimized"] and p1["optimized"]    # the optimizer steps the sharded factors
    assert all(p0["free_is_zero"]) and all(p1["free_is_zero"])
    assert p0["cycles"] == ref["cycles"] == 3
    assert not ref["ranks"].equal(torch.full_like(ref["ranks"], 4))
    assert p0["ranks"].equal(ref["ranks"]) and p1["ranks"].equal(ref["ranks"])
    for a, b in zip(p0["factors"], p1["factors"]): assert torch.equal(a, b)
    gap = max((a - b).abs().max().item() for a, b in zip(p0["factors"], ref["factors"]))
    assert gap <= 1e-4, gap
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "probe.py", str(tmp_path), "1", "accumulate"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    halves = torch.load(tmp_path / "accumulate-world2-process0.pt")
    assert halves["ranks"].equal(p0["ranks"])
    gap = max((a - b).abs().max().item() for a, b in zip(p0["factors"], halves["factors"]))
    assert gap <= 1e-6, gap


def test_trainer_under_zero3_matches_one_process(tmp_path):
    """Trainer + EPnGCallback with the DeepSpeed ZeRO-3 config 11_loop shows (fp32, no offload) on two CPU processes,
    the experts modules made ZeRO-3 leaves, and `stage3_param_persistence_threshold` 0 so that the nano model's small
    factors are partitioned as a large model's are (not kept gathered): cycles edit each process's flat pieces of the
    factors, of DeepSpeed's fp32 copies and of the AdamW moments; freed slots stay exactly zero through later steps; the
    run ends with the ranks of a one-process Trainer run of the same global batch. accelerate 1.x starts DeepSpeed only
    on accelerators (`PartialState` initialises it only when the device is not the CPU), so the probe puts
    accelerate's state in DeepSpeed mode after it is built; from there it is accelerate's own path
    (`deepspeed.initialize` in `Trainer.train`). The factors match the one-process run to 1e-4, not 1e-6: ZeRO-3 sums
    the batch in another order and AdamW divides by sqrt(v), which blows float32 noise up where gradients are tiny
    (measured 7.1e-6; a one-process run of the two halves, as under FSDP2, is no closer)."""
    pytest.importorskip("deepspeed")
    ref, p0, p1 = _run_both(tmp_path, PROBE, "zero3")
    assert (ref["wrapped"], p0["wrapped"]) == ("OlmoeForCausalLM", "DeepSpeedEngine") and p0["zero3"]
    assert p0["cycles"] == ref["cycles"] == 3
    assert all(p0["free_is_zero"]) and all(p1["free_is_zero"]) and len(p0["free_is_zero"]) == 7
    assert not ref["ranks"].equal(torch.full_like(ref["ranks"], 4))
    assert p0["ranks"].equal(ref["ranks"]) and p1["ranks"].equal(ref["ranks"])
    for a, b in zip(p0["factors"], p1["factors"]): assert torch.equal(a, b)
    gap = max((a - b).abs().max().item() for a, b in zip(p0["factors"], ref["factors"]))
    assert gap <= 1e-4, gap

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
    halves = train(TrainArgs(max_steps=8, warmup_steps=2, cycle_interval=3, limit=32, rank=4, batch_size=2, grad_accum=2,
                             output_dir=str(tmp_path / "halves")), progress=False)      # the two halves, summed in order
    assert halves["tuner"].ranks.tolist() == metrics["run"]["ranks"]
    summed = load_file(tmp_path / "halves" / "adapter" / "epng_adapter.safetensors")
    for name, t in run.items():
        if not name.startswith("importance."): assert (t - summed[name]).abs().max() <= 1e-6, name
    mean = lambda a: a["importance.sums"] / a["importance.counts"][:, None]         # saved: the mean over processes
    torch.testing.assert_close(mean(run), mean(single), rtol=1e-5, atol=1e-7)


def test_the_callback_refuses_engines_whose_optimizer_state_it_cannot_edit(monkeypatch):
    "ZeRO stages 1-2 and FSDP version 1 flatten the optimizer state: pruned ranks would come back, so they are refused."
    from types import SimpleNamespace as Args
    import epng
    from epng.loop import EPnGCallback, unreachable_state
    from epng.nano import load_nano
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                "ACCELERATE_DEEPSPEED_CONFIG_FILE"): monkeypatch.delenv(var, raising=False)
    assert unreachable_state(Args(deepspeed={"zero_optimization": {"stage": 2}})) == "DeepSpeed ZeRO stage 2"
    assert unreachable_state(Args(deepspeed={"zero_optimization": {"stage": 3}})) is None
    assert unreachable_state(Args(fsdp=True, fsdp_config={}, fsdp_plugin_args={"fsdp_version": 2})) is None  # Trainer's
    assert unreachable_state(Args(fsdp=True, fsdp_config={})) == "FSDP version 1"
    assert unreachable_state(Args(fsdp=True, fsdp_config={"version": 2})) is None
    assert unreachable_state(Args(fsdp=False, fsdp_config=None, deepspeed=None)) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")                   # accelerate launch with an FSDP config
    assert unreachable_state(Args()) == "FSDP version 1"
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert unreachable_state(Args()) is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")                # accelerate's default stage is 2
    callback = EPnGCallback(epng.attach(load_nano()[0]))
    with pytest.raises(epng.EPnGError, match="cannot run under DeepSpeed ZeRO stage 2"):
        callback.on_init_end(Args(), None, None)
