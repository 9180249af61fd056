"""The paper's models at full size, rehearsed end to end on the CPU: build, `epng train`, resume, adapter, peft, merged save.

    python benchmarks/fullscale.py --model olmoe --workdir /tmp/fs-olmoe      # OLMoE-1B-7B, all 16 layers (~14 GB)
    python benchmarks/fullscale.py --model qwen --workdir /tmp/fs-qwen        # Qwen1.5-MoE-A2.7B, full width, as many
                                                                              # layers as the machine holds
    python benchmarks/fullscale.py --model olmoe --layers 2 --workdir /tmp/x  # full width, 2 layers: a quick look
    python benchmarks/fullscale.py --model olmoe --tiny --fp32 --workdir /tmp/t  # small shapes, exact checks (the test)

Slow: not run by CI (tests/test_fullscale.py runs the same phases with `--tiny`). The model hub is never called: the
architecture comes from `epng.offline_config`, the weights are random (seeded), drawn directly in bf16 (`from_config`
with `dtype=torch.bfloat16`, never an fp32 copy), and saved with `epng.handle.save_streaming` beside the nano model's
byte-level tokenizer. Every phase runs in its own process (so its peak memory is its own):

1. build     the model from its config, random bf16 weights, saved; synthetic MetaMathQA-schema rows (`epng.samples`)
2. train     `epng train` on the folder: `--steps` steps (default 5) at `--seq` tokens, a cycle forced early
             (`--warmup-steps 1 --cycle-interval 2`: cycles after steps 2 and 4), a checkpoint after step 3, the adapter
3. resume    `epng train --resume <run>/checkpoint-3` into a second folder: steps 4-5, the cycle after step 4 included;
             its losses and its adapter must equal the uninterrupted run's, bit for bit
4. merge     a fresh process: base outputs on a short input, `load_adapter` (the run's adapter), adapted outputs,
             `export_peft`, then `merge_and_unload()` (in place: no second model) and `save_streaming` (shard by shard)
5. peft      a fresh process: the saved base wrapped by peft's `PeftModel.from_pretrained` with the export: its outputs
             against the adapted ones
6. reload    a fresh process: `from_pretrained` of the merged folder: its outputs against the merged model's

It prints one row per step of each phase: seconds, peak RSS (VmHWM, which counts the pages of memory-mapped weight
files too) and peak anonymous memory (sampled), then the checks. The parent watches the machine's available memory
and stops a phase that takes it below `--floor` GiB (default 3). Results also go to <workdir>/results.json.
"""
import argparse, contextlib, json, os, platform, re, shutil, subprocess, sys, threading, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
MODELS = {"olmoe": "allenai/OLMoE-1B-7B-0125", "qwen": "Qwen/Qwen1.5-MoE-A2.7B"}
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=4,
            num_experts=8, num_experts_per_tok=2)
TINY_QWEN = dict(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64)
WEIGHT_GB = 14.0      # the default depth of a model too big for the machine: as many full-width layers as fit this
PHASES = ("build", "train", "resume", "merge", "peft", "reload")
GiB = 2 ** 30


# ---------------------------------------------------------------------------------------------------- memory readings
def proc_status(pid="self") -> dict:
    "VmRSS, VmHWM, RssAnon, RssFile of a process, in GiB."
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(m.group(1)) * 1024 / GiB for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")
            if (m := re.search(rf"^{k}:\s+(\d+) kB", text, re.M))}

def meminfo(key: str) -> float:
    "A /proc/meminfo field in GiB (MemTotal, MemAvailable)."
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1)) * 1024 / GiB

class Meter:
    "Rows of (step, seconds, peak RSS, peak anonymous memory) for one phase process; the peak is reset per row."
    def __init__(self): self.rows = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        try: Path("/proc/self/clear_refs").write_text("5")       # resets VmHWM (Linux >= 4.0)
        except OSError: pass
        peak, done = [proc_status()["RssAnon"]], threading.Event()
        def sample():
            while not done.wait(0.2): peak[0] = max(peak[0], proc_status()["RssAnon"])
        watcher = threading.Thread(target=sample, daemon=True); watcher.start()
        start = time.perf_counter()
        try: yield
        finally:
            seconds = time.perf_counter() - start
            done.set(); watcher.join()
            now = proc_status()
            self.rows.append(dict(step=name, seconds=seconds, peak_rss=now["VmHWM"],
                                  peak_anon=max(peak[0], now["RssAnon"])))


# ------------------------------------------------------------------------------------------------------------ config
def with_layers(config, n: int):
    "A copy of `config` with `n` decoder layers (and its per-layer lists cut to match)."
    import copy
    config = copy.deepcopy(config); config.num_hidden_layers = n
    if getattr(config, "layer_types", None): config.layer_types = config.layer_types[:n]
    return config

def model_config(args):
    "The architecture: `offline_config` at full size, or with `--layers` / `--tiny` changes (said in `label`)."
    import epng
    config = epng.offline_config(MODELS[args.model])
    if args.tiny:
        for k, v in {**TINY, **(TINY_QWEN if args.model == "qwen" else {})}.items(): setattr(config, k, v)
        return with_layers(config, args.layers or 2)
    if args.layers:
        if not 1 <= args.layers <= config.num_hidden_layers:
            raise SystemExit(f"--layers {args.layers}: {MODELS[args.model]} has 1..{config.num_hidden_layers} layers")
        return with_layers(config, args.layers)
    return with_layers(config, layers_that_fit(config)) if args.model == "qwen" else config

def weight_bytes(config, dtype_bytes: int = 2) -> int:
    "Bytes of the model's weights (bf16 unless told), counted on the meta device."
    from epng.moe import meta_model, count_parameters
    return count_parameters(meta_model(config)) * dtype_bytes

def layers_that_fit(config, limit: float = WEIGHT_GB * 1e9) -> int:
    "The most layers of `config`'s width whose bf16 weights stay within `limit` bytes."
    full = config.num_hidden_layers
    one, two = weight_bytes(with_layers(config, 1)), weight_bytes(with_layers(config, 2))
    per_layer, rest = two - one, one - (two - one)
    return max(1, min(full, int((limit - rest) // per_layer)))

def label(args, config) -> str:
    "What was built, in words: the model, its shape, how many GB of weights."
    from epng.moe import offline_config
    full = offline_config(MODELS[args.model]).num_hidden_layers
    shape = ("tiny shapes" if args.tiny else "full width") + f", {config.num_hidden_layers} of {full} layers"
    return f"{MODELS[args.model]} ({shape}), {weight_bytes(config, 4 if args.fp32 else 2) / 1e9:.2f} GB of " \
           f"{'fp32' if args.fp32 else 'bf16'} weights"


# ------------------------------------------------------------------------------------------------------------ phases
def paths(workdir) -> dict:
    w = Path(workdir)
    return dict(model=w / "model", data=w / "data.jsonl", run=w / "run", resumed=w / "resumed", peft=w / "peft",
                merged=w / "merged", logits=w / "logits.pt")

def train_argv(args, p: dict, resume: bool) -> list[str]:
    argv = ["train", "--model", str(p["model"]), "--dataset", str(p["data"]), "--dataset-format", "metamathqa",
            "--method", "epng", "--max-steps", str(args.steps), "--batch-size", str(args.batch), "--max-length",
            str(args.seq), "--lr", str(args.lr), "--warmup-steps", "1", "--cycle-interval", "2",
            "--save-steps", str(args.checkpoint), "--seed", "0", "--no-bf16" if args.fp32 else "--bf16",
            "--output-dir", str(p["resumed" if resume else "run"])]
    return argv + (["--resume", str(p["run"] / f"checkpoint-{args.checkpoint}")] if resume else [])

def phase_build(args, meter: Meter, p: dict, checks: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from epng.handle import save_streaming
    from epng.nano import nano_model_path
    from epng.samples import synthetic_rows
    config = model_config(args)
    with meter("build: random weights (from_config)"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if args.fp32 else torch.bfloat16)
    checks["weights_gib"] = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / GiB
    with meter("build: save_streaming"):
        save_streaming(model, p["model"], max_shard_size="1GB")
    for f in ("tokenizer.json", "tokenizer_config.json"): shutil.copy(nano_model_path() / f, p["model"] / f)
    rows = synthetic_rows("metamathqa", n=max(64, args.steps * args.batch * 2), seed=0)
    p["data"].write_text("".join(json.dumps(r) + "\n" for r in rows))

def run_train(args, meter: Meter, p: dict, resume: bool) -> None:
    from epng.cli import main
    name = f"epng train --resume (steps {args.checkpoint + 1}-{args.steps})" if resume else \
           f"epng train ({args.steps} steps, checkpoint {args.checkpoint})"
    shutil.rmtree(p["resumed" if resume else "run"], ignore_errors=True)        # a previous rehearsal's files
    with meter(name): main(train_argv(args, p, resume))

def phase_train(args, meter, p, checks): run_train(args, meter, p, resume=False)

def phase_resume(args, meter, p, checks) -> None:
    import torch
    from epng.checkpoint import read_adapter
    run_train(args, meter, p, resume=True)
    full, resumed = (json.loads((p[k] / "metrics.json").read_text()) for k in ("run", "resumed"))
    checks["losses"] = full["losses"]
    checks["resume_losses_equal"] = full["losses"] == resumed["losses"]
    checks["resume_cycles_equal"] = full["cycles"] == resumed["cycles"]
    (meta_a, a), (meta_b, b) = read_adapter(p["run"] / "adapter"), read_adapter(p["resumed"] / "adapter")
    checks["resume_adapter_equal"] = meta_a["ranks"] == meta_b["ranks"] and set(a) == set(b) and \
        all(torch.equal(a[k], b[k]) for k in a)
    checks["cycles"] = [(c["step"], c["pruned"], c["grown"]) for c in full["cycles"]]

def short_input():
    "16 token ids of the byte tokenizer, the same in every phase."
    import torch
    return torch.randint(3, 259, (1, 16), generator=torch.Generator().manual_seed(1))  # the byte tokenizer's ids

def load_base(args, p):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(p["model"], dtype=torch.float32 if args.fp32 else torch.bfloat16).eval()

def phase_merge(args, meter, p, checks) -> None:
    import torch
    from epng.checkpoint import load_adapter, export_peft
    from epng.handle import save_streaming
    with meter("load base (from_pretrained)"): model = load_base(args, p)
    ids, logits = short_input(), {}
    with torch.no_grad():
        logits["base"] = model(input_ids=ids).logits.float()
        with meter("load_adapter (the run's adapter)"): handle = load_adapter(model, p["run"] / "adapter")
        logits["adapted"] = model(input_ids=ids).logits.float()
        with meter("export_peft"): export_peft(handle, p["peft"], base_model_name_or_path=str(p["model"]))
        pointers = {n: t.data_ptr() for n, t in model.state_dict().items() if "epng" not in n}
        with meter("merge_and_unload (in place)"): merged = handle.merge_and_unload()
        checks["merge_in_place"] = merged is model and all(
            t.data_ptr() == pointers[n] for n, t in merged.state_dict().items())   # no weight was copied
        logits["merged"] = merged(input_ids=ids).logits.float()
    with meter("save_streaming (merged, 1 GB shards)"): save_streaming(merged, p["merged"], max_shard_size="1GB")
    torch.save(logits, p["logits"])

def phase_peft(args, meter, p, checks) -> None:
    import torch
    from peft import PeftModel
    with meter("load base (from_pretrained)"): model = load_base(args, p)
    with meter("peft: PeftModel.from_pretrained(export)"): peft_model = PeftModel.from_pretrained(model, p["peft"]).eval()
    with torch.no_grad(): out = peft_model(input_ids=short_input()).logits.float()
    logits = torch.load(p["logits"]); logits["peft"] = out; torch.save(logits, p["logits"])

def phase_reload(args, meter, p, checks) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    with meter("reload merged (from_pretrained)"):
        model = AutoModelForCausalLM.from_pretrained(p["merged"], dtype=dtype).eval()
    with torch.no_grad(): out = model(input_ids=short_input()).logits.float()
    logits = torch.load(p["logits"]); logits["reloaded"] = out; torch.save(logits, p["logits"])

def compare_logits(p: dict) -> dict:
    "Differences between the outputs on the short input (fp32 logits): largest |difference| and Frobenius norm."
    import torch
    lg = torch.load(p["logits"])
    pairs = {"adapter_effect": ("adapted", "base"), "peft_vs_epng": ("peft", "adapted"),
             "merged_vs_epng": ("merged", "adapted"), "peft_vs_merged": ("peft", "merged"),
             "reloaded_vs_merged": ("reloaded", "merged")}
    out = {k: (lg[a] - lg[b]).abs().max().item() for k, (a, b) in pairs.items()}
    out.update({f"{k}_norm": (lg[a] - lg[b]).norm().item() for k, (a, b) in pairs.items()})
    return {**out, "logit_scale": lg["adapted"].abs().max().item()}

def run_phase(args, name: str) -> None:
    "In the phase's own process: run it and write <workdir>/phase-<name>.json."
    import torch
    torch.set_num_threads(args.threads or torch.get_num_threads())
    p, meter, checks = paths(args.workdir), Meter(), {}
    globals()[f"phase_{name}"](args, meter, p, checks)
    (Path(args.workdir) / f"phase-{name}.json").write_text(json.dumps({"rows": meter.rows, "checks": checks}))


# ------------------------------------------------------------------------------------------------------------ driver
def watch(proc, floor: float, low: list) -> None:
    "Stop `proc` if the machine's available memory falls below `floor` GiB."
    while proc.poll() is None:
        if (avail := meminfo("MemAvailable")) < floor:
            low.append(avail); proc.kill(); return
        time.sleep(0.5)

def spawn(args, name: str, argv: list[str]) -> dict:
    "Run phase `name` in a fresh process; its rows, checks, wall seconds and whole-process peak RSS."
    cmd = [sys.executable, __file__, "--phase", name, *argv]
    start, low = time.perf_counter(), []
    proc = subprocess.Popen(cmd)
    watcher = threading.Thread(target=watch, args=(proc, args.floor, low), daemon=True); watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status); watcher.join()
    if low: raise SystemExit(f"phase {name} stopped: available memory fell to {low[0]:.1f} GiB (floor {args.floor}).")
    if proc.returncode: raise SystemExit(f"phase {name} failed (exit {proc.returncode}); see its output above.")
    out = json.loads((Path(args.workdir) / f"phase-{name}.json").read_text())
    return {**out, "seconds": time.perf_counter() - start, "process_peak_rss": usage.ru_maxrss * 1024 / GiB}

def run_inline(args, name: str) -> dict:
    "Phase `name` in this process (the test's way: no per-phase memory figures worth reading)."
    start = time.perf_counter(); run_phase(args, name)
    out = json.loads((Path(args.workdir) / f"phase-{name}.json").read_text())
    return {**out, "seconds": time.perf_counter() - start, "process_peak_rss": float("nan")}

def machine() -> str:
    import torch, transformers, peft
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.machine())
    return (f"{cpu}, {os.cpu_count()} cores, {meminfo('MemTotal'):.1f} GiB RAM; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}, Python {platform.python_version()}")

def table(results: dict) -> str:
    lines = [f"{'phase | step':<62} {'seconds':>9} {'peak RSS GiB':>13} {'peak anon GiB':>14}"]
    for name, r in results.items():
        for row in r["rows"]:
            lines.append(f"{name + ' | ' + row['step']:<62} {row['seconds']:9.1f} {row['peak_rss']:13.2f} "
                         f"{row['peak_anon']:14.2f}")
        lines.append(f"{name + ' | whole process':<62} {r['seconds']:9.1f} {r['process_peak_rss']:13.2f} {'':>14}")
    return "\n".join(lines)

def verdict(checks: dict, fp32: bool) -> dict:
    """Pass/fail of every promise. fp32: outputs equal to 1e-5. bf16: merging rounds W + ΔW to bf16, so peft's and the
    merged model's outputs must be within a quarter of the adapter's own effect on them (Frobenius norms)."""
    d = checks["logits"]
    if fp32: close = lambda k: d[k] <= 1e-5
    else: close = lambda k: d[f"{k}_norm"] <= 0.25 * d["adapter_effect_norm"]
    return {"resume: same losses": checks["resume_losses_equal"], "resume: same cycles": checks["resume_cycles_equal"],
            "resume: same adapter": checks["resume_adapter_equal"],
            "a cycle ran before the checkpoint and after it": len(checks["cycles"]) >= 2,
            "merge_and_unload copied no weight": checks["merge_in_place"],
            "peft reload = epng outputs": close("peft_vs_epng"), "merged = epng outputs": close("merged_vs_epng"),
            "merged save reloads bit for bit": d["reloaded_vs_merged"] == 0.0,
            "the adapter changed the outputs": d["adapter_effect"] > 0}

def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="olmoe")
    ap.add_argument("--workdir", required=True, help="folder for the model, runs, exports (several GB at full size)")
    ap.add_argument("--layers", type=int, help="decoder layers (default: all; Qwen: as many as fit 14 GB)")
    ap.add_argument("--tiny", action="store_true", help="small shapes (64 hidden, 8 experts): the test's setting")
    ap.add_argument("--fp32", action="store_true", help="fp32 weights (exact comparisons) instead of bf16")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--checkpoint", type=int, default=3, help="the step whose checkpoint the resume starts from")
    ap.add_argument("--seq", type=int, default=128, help="--max-length of epng train")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-2,
                    help="large, so that 5 steps change the outputs well past bf16 rounding (the checks compare them)")
    ap.add_argument("--threads", type=int, help="torch threads per phase (default: torch's choice)")
    ap.add_argument("--floor", type=float, default=3.0, help="stop a phase if available memory falls below (GiB)")
    ap.add_argument("--inline", action="store_true", help="run the phases in this process (no per-phase memory)")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase: return run_phase(args, args.phase)
    if not 1 <= args.checkpoint < args.steps: ap.error("--checkpoint must be a step before the last one")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    config = model_config(args)
    need, avail = weight_bytes(config, 4 if args.fp32 else 2) / GiB, meminfo("MemAvailable")
    print(f"fullscale: {label(args, config)}\n  {machine()}\n  available now {avail:.1f} GiB", flush=True)
    if args.model == "qwen" and not args.layers and not args.tiny:
        from epng.moe import offline_config
        full = offline_config(MODELS["qwen"])
        print(f"  Qwen1.5-MoE-A2.7B at full depth: {weight_bytes(full) / 1e9:.1f} GB of bf16 weights, more than this "
              f"machine's {meminfo('MemTotal'):.1f} GiB of RAM; run at full width with {config.num_hidden_layers} "
              f"of its {full.num_hidden_layers} layers (≤ {WEIGHT_GB:.0f} GB of weights).", flush=True)
    if need + 2 > avail - args.floor:
        raise SystemExit(f"{need:.1f} GiB of weights + ~2 GiB of training state do not fit the {avail:.1f} GiB "
                         f"available with a {args.floor} GiB floor: use --layers.")
    passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--inline",)]
    results = {}
    for name in PHASES:
        print(f"--- {name}", flush=True)
        results[name] = run_inline(args, name) if args.inline else spawn(args, name, passed)
    checks = {k: v for r in results.values() for k, v in r["checks"].items()}
    checks["logits"] = compare_logits(paths(args.workdir))
    ok = verdict(checks, args.fp32)
    print("\n" + label(args, config) + "\n" + machine() + "\n" + table(results))
    print(f"\nlosses {['%.4f' % l for l in checks['losses']]}; cycles (step, pruned, grown) {checks['cycles']}")
    d = checks["logits"]
    print(f"outputs on a 16-token input (logits up to {d['logit_scale']:.3g}), max |difference| and norm of the difference:")
    for k in ("adapter_effect", "peft_vs_epng", "merged_vs_epng", "peft_vs_merged", "reloaded_vs_merged"):
        print(f"  {k:<20} {d[k]:10.3g} {d[k + '_norm']:10.3g}")
    for k, v in ok.items(): print(f"  {'ok  ' if v else 'FAIL'} {k}")
    summary = dict(label=label(args, config), machine=machine(), phases=results, checks=checks, verdict=ok)
    (Path(args.workdir) / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    if not all(ok.values()) and argv is None: raise SystemExit(1)
    return summary

if __name__ == "__main__": main()
