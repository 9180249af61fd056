"""bf16 correctness of epng on a GPU (run where one is present): `python benchmarks/gpu_check.py`.

On an OLMoE-width model of two layers, in bf16 on CUDA: the epng forward agrees with its merged model, slots past an
expert's rank get exactly zero gradient, growth leaves the output unchanged, and a pruned expert stays at zero
through AdamW steps. Prints each check's measured figure and exits non-zero if one fails.
"""
import os, sys
import torch
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import AutoModelForCausalLM, OlmoeConfig
import epng

def main():
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    cfg = OlmoeConfig(vocab_size=1024, hidden_size=2048, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=16, num_experts=64, num_experts_per_tok=8, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16)
    h = epng.attach(model)
    with torch.no_grad():
        for lora in h.loras:
            for b in lora.B.values(): b.normal_(std=0.02)
    ids = torch.randint(3, 1024, (4, 256), device="cuda")
    failures = []
    def check(name, ok, figure):
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {figure}")
        if not ok: failures.append(name)

    h.prune(0, 3); h.grow(0, 4, 12)          # ranks 0 and 20 next to 8
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits.float()
        ref = h.merged_model()(input_ids=ids).logits.float()
    rel = ((out - ref).norm() / ref.norm()).item()
    check("forward vs merged model (bf16)", rel < 2e-2, f"relative L2 difference {rel:.2e}")

    opt = torch.optim.AdamW(h.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    h.bind_optimizer(opt)
    model.train()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        dead = sum(float(l.A[t].grad[l.slot_owner < 0].abs().sum()) for l in h.loras for t in l.shapes)
        opt.step(); opt.zero_grad()
    check("gradient on free slots", dead == 0.0, f"sum |grad| {dead}")
    pruned = sum(float(p.detach()[h.loras[0].slot_owner < 0].abs().sum()) for p in h.loras[0].parameters())
    check("pruned expert after fused AdamW steps", pruned == 0.0, f"sum |factors| {pruned}")

    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        h.grow(1, 7, 30)                      # into free slots, a new slot group of width 40
        after = model(input_ids=ids).logits
    diff = (before.float() - after.float()).abs().max().item()
    check("growth leaves the output unchanged", diff == 0.0, f"max |Δlogits| {diff}")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    sys.exit(1 if failures else 0)

if __name__ == "__main__":
    main()
