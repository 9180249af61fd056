"""benchmarks/fullscale.py, the full-size rehearsal, on tiny shapes: every phase and every promise it checks; and the
in-place merge's memory against the copy's, measured. The full-size run itself is slow (EPNG_SLOW=1)."""
import importlib.util, json, os, subprocess, sys
from pathlib import Path
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "fullscale.py"


@pytest.fixture(scope="module")
def fullscale():
    spec = importlib.util.spec_from_file_location("epng_fullscale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["olmoe", "qwen"])
def test_every_phase_on_tiny_shapes(fullscale, tmp_path, arch):
    "build → epng train → resume → load_adapter, export_peft, merge_and_unload, save_streaming → peft → reload, in fp32."
    out = fullscale.main(["--model", arch, "--tiny", "--fp32", "--inline", "--workdir", str(tmp_path)])
    checks, logits = out["checks"], out["checks"]["logits"]
    assert checks["resume_losses_equal"] and checks["resume_adapter_equal"] and checks["resume_cycles_equal"]
    assert [step for step, *_ in checks["cycles"]] == [2, 4]          # one cycle before the checkpoint, one after
    assert checks["merge_in_place"]
    assert logits["adapter_effect"] > 1e-4                            # the comparisons below can tell adapters apart
    assert logits["peft_vs_epng"] <= 1e-5 and logits["merged_vs_epng"] <= 1e-5
    assert logits["reloaded_vs_merged"] == 0.0
    assert all(out["verdict"].values()), out["verdict"]
    index = tmp_path / "merged" / "model.safetensors"                  # one shard, named as save_pretrained names it
    assert index.exists() and (tmp_path / "peft" / "adapter_config.json").exists()
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["phases"]) == set(fullscale.PHASES)


def test_a_broken_promise_fails(fullscale, tmp_path):
    "The verdict is a real check: a resume that drifted, or a peft reload off by more than rounding, fails."
    checks = {"resume_losses_equal": True, "resume_cycles_equal": True, "resume_adapter_equal": True, "cycles": [2, 4],
              "merge_in_place": True, "logits": {"adapter_effect": 0.5, "peft_vs_epng": 1e-7, "merged_vs_epng": 1e-7,
                                                 "reloaded_vs_merged": 0.0, "adapter_effect_norm": 2.0,
                                                 "peft_vs_epng_norm": 1e-6, "merged_vs_epng_norm": 1e-6}}
    assert all(fullscale.verdict(checks, fp32=True).values())
    assert not fullscale.verdict({**checks, "resume_losses_equal": False}, fp32=True)["resume: same losses"]
    off = {**checks, "logits": {**checks["logits"], "peft_vs_epng": 1e-3, "peft_vs_epng_norm": 0.05}}
    assert not fullscale.verdict(off, fp32=True)["peft reload = epng outputs"]
    assert fullscale.verdict(off, fp32=False)["peft reload = epng outputs"]     # bf16: judged against the effect
    worse = {**checks, "logits": {**checks["logits"], "peft_vs_epng_norm": 0.6}}  # more than a quarter of it
    assert not fullscale.verdict(worse, fp32=False)["peft reload = epng outputs"]


MEASURE = r"""
import gc, re, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
import epng
def status(key): return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(epng.tiny_moe_config("olmoe", hidden_size=256, intermediate_size=512,
                                                              num_experts=32, vocab_size=256))
handle = epng.attach(model, epng.EPnGConfig(rank=8))
with torch.no_grad():
    for lora in handle.loras: lora.B["up_proj"].normal_(std=0.02)
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
pointers = {n: t.data_ptr() for n, t in model.state_dict().items() if "epng" not in n}
gc.collect()
Path("/proc/self/clear_refs").write_text("5")                 # VmHWM := VmRSS now
before = status("VmRSS")
merged = handle.merged_model() if sys.argv[1] == "copy" else handle.merge_and_unload()
extra = status("VmHWM") - before
kept = sys.argv[1] == "copy" or all(t.data_ptr() == pointers[n] for n, t in merged.state_dict().items())
print(extra, weights, int(kept))
"""

def peak_extra(method: str) -> tuple[int, int, bool]:
    "Peak memory above the attached model while `method` ('copy' or 'in_place') merges, in a fresh process."
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEASURE, method], capture_output=True, text=True, env=env, check=True)
    extra, weights, kept = map(int, out.stdout.split()[-3:])
    return extra, weights, bool(kept)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_merge_and_unload_needs_no_second_model():
    "Measured: merged_model() holds a second copy of the weights at its peak; merge_and_unload() does not."
    copy_extra, weights, _ = peak_extra("copy")
    here_extra, _, kept = peak_extra("in_place")
    assert weights > 100 * 2**20                                  # large enough that allocator noise does not matter
    assert copy_extra >= 0.8 * weights, (copy_extra, weights)     # the copy: a second model
    assert here_extra <= 0.2 * weights, (here_extra, weights)     # in place: a few per-expert ΔW at a time
    assert here_extra <= copy_extra and kept                      # and every weight stayed where it was


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("EPNG_SLOW") != "1", reason="OLMoE-1B-7B at full size: ~16 GiB, ~30 min on 2 cores")
def test_full_size_olmoe(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--model", "olmoe", "--workdir", str(tmp_path)], check=True)
