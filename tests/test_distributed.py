"transformers.Trainer with EPnGCallback on two CPU processes: DistributedDataParallel holds the fixed-shape factors."
import os, socket, subprocess, sys, textwrap
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def test_trainer_under_ddp_matches_one_process(tmp_path):
    "Two processes of 2 rows a step and one of 4 end with the same ranks; the factors agree to float32 noise."
    (tmp_path / "probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    one = subprocess.run([sys.executable, "probe.py", str(tmp_path), "1"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "probe.py", str(tmp_path), "2"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    ref, p0, p1 = (torch.load(tmp_path / f) for f in ("world1-process0.pt", "world2-process0.pt", "world2-process1.pt"))
    assert (ref["wrapped"], p0["wrapped"]) == ("OlmoeForCausalLM", "DistributedDataParallel")
    assert p0["cycles"] == ref["cycles"] == 3 and p0["same_parameters"] and p1["same_parameters"]
    assert not ref["ranks"].equal(torch.full_like(ref["ranks"], 4))          # the cycles moved ranks
    assert p0["ranks"].equal(ref["ranks"]) and p1["ranks"].equal(ref["ranks"])
    for a, b in zip(p0["factors"], p1["factors"]): assert torch.equal(a, b)   # DDP keeps the processes identical
    gap = max((a - b).abs().max().item() for a, b in zip(p0["factors"], ref["factors"]))
    assert gap <= 1e-4, gap      # float32 sums in another order, grown by AdamW (measured 1.8e-5)
