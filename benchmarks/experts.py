"""Forward+backward time and peak memory of one MoE block at OLMoE width: frozen base vs epng vs peft.

    python benchmarks/experts.py                 # CPU, fp32
    python benchmarks/experts.py --device cuda   # GPU, bf16
    python benchmarks/experts.py --threads 1     # CPU on one thread: steadier on a shared machine

Variants, all on the same block (H 2048, I 1024, 64 experts, top-8), the input requiring grad:
  base        frozen experts, transformers' grouped_mm path
  epng        rank-8 LoRA on gate and up of every expert
  epng-skew   a real run's rank map: 50 of 64 experts pruned, 14 at rank 36-37 (mean rank 8)
  peft        peft LoraConfig(target_parameters=["mlp.experts.gate_up_proj"]) with r=12: the same trainable count
Time: median and minimum over interleaved rounds, so drift hits every variant alike. Memory: the peak above the resident
weights and input during one forward+backward (CPU: VmHWM of a fresh process per variant; GPU: allocator peak).
Prints ratios to the frozen base and skewed/uniform, measured in this one run.
"""
import argparse, gc, json, os, statistics, subprocess, sys, time
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VARIANTS = ("base", "epng", "epng-skew", "peft")

def build(variant, device, dtype):
    from transformers import AutoModelForCausalLM, OlmoeConfig
    import epng
    torch.manual_seed(0)
    cfg = OlmoeConfig(vocab_size=128, hidden_size=2048, intermediate_size=1024, num_hidden_layers=1,
                      num_attention_heads=16, num_experts=64, num_experts_per_tok=8, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.requires_grad_(False)
    if variant.startswith("epng"):
        h = epng.attach(model, epng.EPnGConfig(rank=8))
        with torch.no_grad():
            for p in h.parameters(): p.normal_(std=0.01)
        if variant == "epng-skew":  # a real run's map: 50 experts pruned, their 400 ranks on 14 experts (36-37)
            for e in range(50): h.prune(0, e)
            for e in range(50, 64): h.grow(0, e, 29 if e < 58 else 28)
            assert int(h.ranks.sum()) == 8 * 64 and int(h.ranks.max()) == 37
        trainable = h.num_trainable()
    elif variant == "peft":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=12, lora_alpha=24, target_modules=[],
                                                 target_parameters=["mlp.experts.gate_up_proj"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n: p.normal_(std=0.01)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        trainable = 0
    block = next(m for m in model.modules() if type(m).__name__ == "OlmoeSparseMoeBlock")
    return model, block, trainable

def inputs(tokens, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, tokens, 2048, generator=g).to(device, dtype).requires_grad_(True)
    grad = torch.randn(1, tokens, 2048, generator=g).to(device, dtype)
    return x, grad

def fwd_bwd(block, x, grad):
    x.grad = None
    block(x).backward(grad)
    for p in block.parameters(): p.grad = None

def sync(device):
    if device == "cuda": torch.cuda.synchronize()

def cpu_peak(variant, tokens):
    "Run in a fresh process: peak RSS above the resident weights and input during one forward+backward."
    model, block, _ = build(variant, "cpu", torch.float32)
    x, grad = inputs(tokens, "cpu", torch.float32)
    fwd_bwd(block, x, grad)  # first call allocates lazily-built state; measure the second
    gc.collect()
    status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
    resident = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f: f.write("5")  # reset the high-water mark to the current RSS
    fwd_bwd(block, x, grad)
    return status("VmHWM:") - resident

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    ap.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    if args.peak_of:
        print(json.dumps(cpu_peak(args.peak_of, args.tokens))); return
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.device == "cpu": torch.manual_seed(0)
    built = {v: build(v, args.device, dtype) for v in VARIANTS}
    trainable = {v: b[2] for v, b in built.items()}
    x, grad = inputs(args.tokens, args.device, dtype)
    times = {v: [] for v in VARIANTS}
    peaks = {}
    for v, (_, block, _) in built.items():  # warm-up, and the GPU peak
        fwd_bwd(block, x, grad); sync(args.device)
        if args.device == "cuda":
            torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fwd_bwd(block, x, grad); sync(args.device)
            peaks[v] = torch.cuda.max_memory_allocated() - before
    for _ in range(args.rounds):
        for v, (_, block, _) in built.items():
            sync(args.device); t0 = time.perf_counter()
            fwd_bwd(block, x, grad); sync(args.device)
            times[v].append(time.perf_counter() - t0)
    if args.device == "cpu":
        del built; gc.collect()
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--peak-of", v, "--tokens", str(args.tokens),
                                  *(["--threads", str(args.threads)] if args.threads else [])],
                                 capture_output=True, text=True, check=True)
            peaks[v] = json.loads(out.stdout.strip().splitlines()[-1])
    name = (torch.cuda.get_device_name() if args.device == "cuda"
            else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} thread(s))")
    print(f"one OLMoE-width MoE block, {args.tokens} tokens, {str(dtype).split('.')[-1]}, {name}, "
          f"torch {torch.__version__}, {args.rounds} interleaved rounds")
    base_t, base_m = statistics.median(times["base"]), peaks["base"]
    print(f"{'variant':10s} {'trainable':>10s} {'median ms':>10s} {'× base':>7s} {'× peft':>7s} {'min ms':>8s} "
          f"{'× base':>7s} {'× peft':>7s} {'peak MiB':>9s} {'× base':>7s}")
    for v in VARIANTS:
        med, low = statistics.median(times[v]), min(times[v])
        print(f"{v:10s} {trainable[v]:10,d} {1000 * med:10.1f} {med / base_t:7.2f} "
              f"{med / statistics.median(times['peft']):7.2f} {1000 * low:8.1f} {low / min(times['base']):7.2f} "
              f"{low / min(times['peft']):7.2f} {peaks[v] / 2**20:9.0f} {peaks[v] / base_m:7.2f}")
    skew, uni = times["epng-skew"], times["epng"]
    print(f"skewed / uniform rank 8: {statistics.median(skew) / statistics.median(uni):.3f} (median), "
          f"{min(skew) / min(uni):.3f} (min); peak: skewed {peaks['epng-skew'] / base_m:.2f}×, "
          f"uniform {peaks['epng'] / base_m:.2f}× the frozen block")

if __name__ == "__main__":
    main()
