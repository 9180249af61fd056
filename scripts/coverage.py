"""Which transformers MoE families epng covers: a tiny model of every family with fused experts, checked end to end.

For every model type whose modeling module defines a causal-LM class and an experts module built with transformers'
`use_experts_implementation` decorator, the script builds a tiny config from the family's own defaults (sizes shrunk
generically), gives the routers learned-looking weights, and records: the router kind epng reads, whether `attach`
works (or the reason it refuses), whether epng's importance agrees with an independent computation from the routing
of the same forward (the router's outputs; for a router that returns only logits, the choice its block hands the
experts), whether the merged model equals the adapted one, whether a prune-and-grow cycle keeps the rank budget,
and whether the peft export reloads to the same logits. Then it builds the family at its DEFAULT config size (its
config class's defaults, for most families the released model's shape) on the meta device, where no weight takes
memory, and records the MoE layers found, their (E, H, I), whether `epng.attach` takes them and the share of the base
parameters rank-8 LoRA trains; the same for the modules with fused experts but no causal-LM class, on their
ForConditionalGeneration class. It writes the table to docs/coverage.md.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/coverage.py                    # every family
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/coverage.py --families olmoe gpt_oss --out /tmp/c.md
"""
from __future__ import annotations
import argparse, collections, contextlib, copy, datetime, importlib, inspect, re, sys, tempfile, time, warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
import transformers.integrations.moe as hf_moe

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
import epng
from epng.gates import GateCollector
from epng.checkpoint import export_peft
from epng.lora import ExpertLoRA

COMMAND = "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/coverage.py"
UP_ONLY_TARGETS = ("up_proj", "down_proj")   # for experts without a gate (Nemotron-H), which refuse gate_proj
SEQ, BATCH = 16, 4

# --- 1. which families ------------------------------------------------------------------------------------------------

def modeling_module(model_type: str):
    "The modeling module of `model_type`, or None when it has none that imports."
    name = model_type_to_module_name(model_type)
    try: return importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except Exception: return None

def fused_experts_classes(module) -> list[str]:
    "Classes of `module` whose forward is the one `use_experts_implementation` installs."
    found = []
    for name, cls in vars(module).items():
        code = getattr(getattr(cls, "forward", None), "__code__", None)
        if inspect.isclass(cls) and cls.__module__ == module.__name__ and code is not None \
                and code.co_filename == hf_moe.__file__:
            found.append(name)
    return found

def causal_lm_class(model_type: str, config_class, module):
    "The causal-LM class of `model_type`: AutoModelForCausalLM's, else a `*ForCausalLM` of its module for this config."
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name: return getattr(transformers, name, None) or getattr(module, name, None), True
    for cls_name, cls in vars(module).items():
        if inspect.isclass(cls) and cls_name.endswith("ForCausalLM") \
                and getattr(cls, "config_class", None) is config_class:
            return cls, False
    return None, False

def text_model_type(model_type: str) -> str:
    "The model type of the text part of a multimodal config (the type itself for a text model)."
    try: config = AutoConfig.for_model(model_type)
    except Exception: return model_type
    text = config.get_text_config()
    return getattr(text, "model_type", model_type) or model_type

def moe_families() -> tuple[list[str], dict[str, str]]:
    """(families, skipped): the text model types with fused experts and a causal-LM class; and each modeling module
    with fused experts but no causal-LM class for any of its model types, with that reason."""
    families, with_experts, covered = [], set(), set()
    for model_type in CONFIG_MAPPING_NAMES:
        module = modeling_module(model_type)
        if module is None or not fused_experts_classes(module): continue
        with_experts.add(module.__name__)
        family = text_model_type(model_type)            # a multimodal config: its text part
        family_module = modeling_module(family) or module
        if causal_lm_class(family, type(AutoConfig.for_model(family)), family_module)[0] is None: continue
        covered.add(family_module.__name__)
        if family not in families: families.append(family)
    skipped = {m.rpartition(".modeling_")[2]: "no causal-LM class for any of its model types"
               for m in sorted(with_experts - covered)}
    return families, skipped


# --- 2. a tiny config from the family's defaults ------------------------------------------------------------------

EXPERTS = re.compile(r"^(n_routed|num|n|moe_num|num_local|num_routed)_experts$")
TOP_K = re.compile(r"per_tok|^(moe_)?top_?k(_experts)?$|^moe_k$")

def _shrunk(key: str, value):
    "The tiny value of one config field, or None to leave it as the family has it."
    k = key.lower()
    if isinstance(value, bool):   # a switch that turns the MoE block on (Gemma 4 has it off by default)
        return True if re.match(r"(enable|use)_moe", k) else None
    if value is None:             # a MoE that is off by default leaves its sizes unset
        unset = [(k == "head_dim", 16), (EXPERTS.match(k) is not None, 8), (TOP_K.search(k) is not None, 2),
                 (k == "moe_intermediate_size", 32),
                 (re.match(r"(n|num)_shared_experts$", k) is not None, 1)]   # dots1 leaves it None and cannot build
        return next((v for hit, v in unset if hit), None)
    if isinstance(value, list):   # lists of layer indices (dense-only or MLP-only layers): none, every layer is MoE
        only_layers = re.search(r"(only|dense)_layers$|^mlp_only", k)
        return [] if only_layers and all(isinstance(v, int) for v in value) else None
    if not isinstance(value, int): return None
    rules = [
        (k == "hidden_size", 64), ("vocab_size" in k, 256), (k == "num_hidden_layers", 2),
        ("intermediate_size" in k or k in ("ffn_dim", "ffn_hidden_size", "moe_ffn_hidden_size"), 32),
        ("hidden_size" in k and value > 0, 16),                       # e.g. hidden_size_per_layer_input
        (k == "num_attention_heads", 4), (k == "num_key_value_heads", 4),
        (k.endswith("head_dim") and ("rope" in k or "nope" in k), 8), (k.endswith("head_dim"), 16),
        (k.endswith(("_heads", "n_heads")) and value > 0, 4),
        (k.endswith("lora_rank") and value > 0, 16),
        (k in ("n_group", "num_expert_group") and value > 1, 2), (k in ("topk_group", "topk_groups") and value > 1, 1),
        ("shared_expert" in k and value > 0, 1),                       # n_shared_experts, num_shared_experts
        (EXPERTS.match(k) is not None and value >= 1, 8),
        (TOP_K.search(k) is not None and value > 0, 2),
        (k in ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index", "expert_layer_offset"), 0),
        (k in ("decoder_sparse_step", "moe_layer_freq", "expert_layer_period", "sparse_step"), 1),
        (k == "attn_layer_period", 2), (k == "attn_layer_offset", 1),   # periodic layer kinds: one of each in 2
        (k == "max_position_embeddings", 256), (k == "sliding_window" and value > 64, 64),
        (k == "pad_token_id", 0), (k == "bos_token_id", 1), (k == "eos_token_id", 2),
        (k.endswith("_token_id") and value >= 256, 3),
    ]
    return next((v for hit, v in rules if hit), None)

def _layer_subset(defaults: dict) -> dict:
    "Per-layer lists and strings (layer kinds, MLP kinds) cut to one layer of each kind, in order, at least two."
    n = defaults.get("num_hidden_layers")
    if not isinstance(n, int) or n <= 2: return {}
    per_layer = {k: v for k, v in defaults.items()
                 if isinstance(v, (list, str)) and len(v) == n and k != "model_type"}
    keep = sorted({list(v).index(kind) for v in per_layer.values() for kind in dict.fromkeys(v)})
    keep = sorted(keep + [i for i in range(n) if i not in keep][:max(0, 2 - len(keep))])   # at least two layers
    out = {k: [v[i] for i in keep] if isinstance(v, list) else "".join(v[i] for i in keep)
           for k, v in per_layer.items()}
    if per_layer: out["num_hidden_layers"] = len(keep)
    return out

def _partial_rotary(defaults: dict) -> float:
    "The smallest partial rotary factor in the config (1 when rotary embeddings cover the whole head)."
    found = []
    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                if k == "partial_rotary_factor" and isinstance(x, (int, float)): found.append(x)
                else: walk(x)
    walk(defaults)
    return min(found, default=1.0)

def _head_dim(defaults: dict) -> int:
    "16, or the next multiple of 8 whose rotary part is a positive even width (a factor of 0.334 makes 16 odd)."
    p = _partial_rotary(defaults)
    return next(d for d in range(16, 257, 8) if int(d * p) > 0 and int(d * p) % 2 == 0)

# Families whose defaults the generic shrink cannot turn into a buildable tiny config; each entry says why.
OVERRIDES: dict[str, dict] = {
    # the config accepts top-1 routing only
    "zaya": dict(num_experts_per_tok=1),
    # the defaults leave layer_types None, which the modeling code indexes per layer
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    # the Mamba layers' 8 groups must divide their heads, shrunk to 4
    "nemotron_h": dict(n_groups=2),
    # the defaults leave the QSA indexer of 'indexed_attention' layers unset, which the modeling code divides by
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                           indexer_compress_ratio=2, hc_lowrank=16),
}

def tiny_config(family: str):
    "A small config of `family`: its defaults with every size-like field shrunk."
    config = AutoConfig.for_model(family)
    defaults = config.to_dict()
    kwargs = {k: v for k, v in ((k, _shrunk(k, v)) for k, v in defaults.items()) if v is not None}
    kwargs.update(_layer_subset(defaults))
    kv, heads = defaults.get("num_key_value_heads"), defaults.get("num_attention_heads")
    if isinstance(kv, int) and isinstance(heads, int) and kv < heads:   # grouped queries stay grouped (MiMo doubles
        kwargs["num_key_value_heads"] = 1 if kv == 1 else 2            # the kv heads of its sliding layers)
    kwargs.update({k: _head_dim(defaults) for k, v in kwargs.items() if v == 16 and k.endswith("head_dim")})
    kwargs.update(OVERRIDES.get(family, {}))
    # A field that is no argument of the config's __init__ may be derived from others (MLA's head_dim is the rope
    # width): build once with the arguments alone, then pass such a field only if that build left it unchanged.
    own = inspect.signature(type(config).__init__).parameters
    first = {k: v for k, v in kwargs.items() if k in own}
    try: probe = AutoConfig.for_model(family, **first).to_dict()
    except Exception: return AutoConfig.for_model(family, **kwargs)
    free = {k: v for k, v in kwargs.items() if k not in own and probe.get(k) == defaults.get(k)}
    return AutoConfig.for_model(family, **first, **free)

def build_model(family: str):
    "The tiny causal LM of `family`, fp32 on the CPU, seeded; and how it was built."
    config = tiny_config(family)
    cls, auto = causal_lm_class(family, type(config), modeling_module(family))
    torch.manual_seed(0)
    if auto: return AutoModelForCausalLM.from_config(config, dtype=torch.float32), "AutoModelForCausalLM"
    return cls._from_config(config, dtype=torch.float32), cls.__name__

# --- 3. learned-looking routers and an independent reading ----------------------------------------------------------

def learned_looking(model, layers, seed: int = 0) -> None:
    "Router logits of order one and a non-zero correction bias (std 0.3), as tests/test_routers.py makes them."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            E = layer.num_experts
            for m in layer.router.modules():
                w = getattr(m, "weight", None)   # (E, H), or a row more for a shared or null expert (Inkling, Zaya)
                if isinstance(w, torch.Tensor) and w.dim() == 2 and E <= w.shape[0] <= E + 1 and m is not layer.experts:
                    w.copy_(0.15 * torch.randn(w.shape, generator=g))
            for name, t in [*layer.block.named_buffers(), *layer.block.named_parameters()]:
                if "bias" in name and t.numel() == E and t.shape[-1] == E and not name.startswith(("experts", "shared")):
                    t.copy_(0.3 * torch.randn(t.shape, generator=g))   # (E,), or (1, E) as Ernie 4.5 keeps it
            table = getattr(layer.router, "tid2eid", None)
            if table is not None:   # a hash table that favours low expert ids, as a real one is uneven
                favoured = torch.linspace(2, 0.2, E).expand(len(table), E)
                table.copy_(torch.multinomial(favoured, layer.top_k, generator=g))

# the score functions written out independently of epng (which infers them in log space from SCORE_FUNCTIONS)
REFERENCE_SCORES = {"softmax": lambda l: l.softmax(-1), "sigmoid": torch.sigmoid, "probabilities": lambda p: p,
                    "sqrtsoftplus": lambda l: torch.nn.functional.softplus(l).sqrt()}

def reference_kind(logits, weights, index, routes_by_token: bool) -> str:
    "The score function the chosen experts' weights are proportional to (a direct ratio test); 'hash' for a hash layer."
    if routes_by_token: return "hash"
    if weights is None: return "no choice seen"
    spreads = {}
    for name, f in REFERENCE_SCORES.items():
        with torch.no_grad():
            ratio = weights.double() / f(logits.double()).gather(1, index.long())
        ok = torch.isfinite(ratio).all(1) & (ratio > 0).all(1)
        if not ok.any(): continue
        r = ratio[ok] if index.shape[1] > 1 else ratio[ok].T   # top-1: one factor for all tokens, not one per token
        spreads[name] = float(((r.amax(1) - r.amin(1)) / r.amax(1)).median())
    best = min(spreads, key=spreads.get, default=None)
    return best if best is not None and spreads[best] < 1e-3 else "none"

def reference_reading(call, kind: str, importance: str, num_experts: int) -> torch.Tensor:
    """Mean per-expert reading of one layer from its routing calls' (logits, weights, index): f/Σf for 'gate', 1/k per
    choice for 'selection', each choice's share of the token's routing weight for 'weight'."""
    logits, w, index = call[0].double(), call[1].double(), call[2].long()
    if importance == "gate" and kind in REFERENCE_SCORES:
        s = REFERENCE_SCORES[kind](logits)
        return (s / s.sum(-1, keepdim=True)).mean(0)[:num_experts]   # scores past E: a shared or null expert's
    if importance == "weight": share = w / w.sum(-1, keepdim=True)
    else: share = (w != 0).double() / index.shape[1]                  # a pick with weight 0 is a masked null expert
    return torch.zeros(len(logits), logits.shape[1], dtype=torch.double).scatter_add_(1, index, share).mean(0)[:num_experts]

def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    "Spearman's rank correlation (tied values share their mean rank); 1 when both are constant and equal."
    def ranks(x):
        x = x.double()
        r = torch.empty_like(x); r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
        for v in x.unique(): r[x == v] = r[x == v].mean()
        return r - r.mean()
    ra, rb = ranks(a), ranks(b)
    if ra.norm() == 0 or rb.norm() == 0: return 1.0 if torch.equal(ra, rb) else 0.0
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))

def _router_output(output):
    "(logits, weights, index) from a router's output, read here without epng; weights and index None for logits only."
    if isinstance(output, (tuple, list)) and len(output) >= 3 and torch.is_tensor(output[2]) \
            and not output[2].is_floating_point():
        return output[0], output[1], output[2]
    return (output[0] if isinstance(output, (tuple, list)) else output), None, None

def _choice_handed_to(experts):
    "A function of an experts call's (args, kwargs) giving the (weights, index) the block hands them."
    names = [n for n, p in inspect.signature(experts.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]   # (hidden_states, top_k_index, top_k_weights)
    def read(args, kwargs):
        index, weights = [args[i] if len(args) > i else kwargs.get(names[i]) if len(names) > i else None for i in (1, 2)]
        return weights, index
    return read

NEVER_CALLED = "router never called"   # the reference of a layer whose experts ran without a call of its router

def record_router_outputs(layers):
    """Hooks that keep every training-mode routing call's (logits, weights, index) per layer; returns (store, hooks).
    A router that returns only logits leaves the choice to its block: weights and index are then the ones the block
    hands its experts. An experts call with no router call before it is kept as NEVER_CALLED. The hooks run before
    any other hook on the router and experts, so they see a call that epng then refuses."""
    store, pending = {layer.index: [] for layer in layers}, {}
    counts = lambda m: m.training and torch._C._current_graph_task_id() == -1   # not a checkpointing re-run
    def router_hook(layer):
        def hook(module, args, output):
            if counts(module): pending[layer.index] = [t if t is None else t.detach() for t in _router_output(output)]
        return hook
    def experts_hook(layer):
        read = _choice_handed_to(layer.experts)
        def hook(module, args, kwargs):
            if not counts(module): return
            call = pending.pop(layer.index, None)
            if call is None: store[layer.index].append(NEVER_CALLED); return
            logits, weights, index = call
            if index is None:   # logits only: the block chose, and tells the experts
                weights, index = read(args, kwargs)
                if not (torch.is_tensor(weights) and torch.is_tensor(index) and index.dim() == 2):
                    weights = index = None
                elif weights.shape != index.shape: weights = weights.gather(-1, index.long())   # a dense (T, E) table
            store[layer.index].append((logits.double(), None if weights is None else weights.detach().double(),
                                       None if index is None else index.detach()))
        return hook
    return store, [*(l.router.register_forward_hook(router_hook(l), prepend=True) for l in layers),
                   *(l.experts.register_forward_pre_hook(experts_hook(l), with_kwargs=True, prepend=True) for l in layers)]

def never_called(calls) -> bool: return NEVER_CALLED in calls

def departure(logits, index) -> float:
    "Share of tokens whose chosen experts are not the top-k of the logits (every score function keeps their order)."
    top = logits.topk(index.shape[1], dim=-1).indices.sort(-1).values
    return float((top != index.long().sort(-1).values).any(-1).double().mean())

# --- 4. one family, end to end --------------------------------------------------------------------------------------

@dataclass
class Row:
    family: str
    built_with: str = ""
    router: str = ""                  # the score function epng infers, per MoE layer (collapsed when all agree)
    reference_router: str = ""        # the one the independent ratio test finds
    attach: str = ""                  # ok / refused: ... / could not build: ...
    refusal_kind: str = ""            # the error class of a refusal
    gate: str = ""                    # importance='gate': faithful (Spearman) / NOT faithful / refused: ...
    selection: str = ""
    weight: str = ""
    departure: str = ""               # share of tokens whose choice is not the top-k of the scores
    merged: str = ""
    cycle: str = ""
    peft: str = ""
    faithful: bool | None = None      # None: importance was not checked (no attach)
    default_size: str = ""            # the default-size model on the meta device: ok (...) / refused: ... / could not build
    default_refusal: str = ""         # the error class of a refusal there
    default_shapes: list = field(default_factory=list)   # (E, H, I) of every MoE layer found there
    notes: list = field(default_factory=list)

def first_sentence(message: str) -> str:
    "The first sentence of an error message (up to '. ' or the end), one line."
    message = " ".join(str(message).split())
    cut = re.search(r"[.!?](\s|$)", message[20:])
    return message[:20 + cut.start() + 1] if cut else message

def _collapse(values: list[str]) -> str:
    return values[0] if len(set(values)) == 1 else ", ".join(values)

def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (BATCH, SEQ), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))

@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(**batch, use_cache=False).logits.double()

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

class RoutesWithoutRouter(Exception):
    "epng refused a training forward in which some block's experts ran without a call of its router."
    def __init__(self, error: Exception): super().__init__(str(error)); self.error = error

def check_readings(row: Row, model, handle) -> None:
    "One training forward: epng's three readings against the routing calls of that same forward."
    layers = handle.layers
    selection = epng.ExpertImportance(len(layers), layers[0].num_experts)
    weight = epng.ExpertImportance(len(layers), layers[0].num_experts)
    collector = GateCollector(model, layers, selection.add, importance="selection")
    by_weight = GateCollector(model, layers, weight.add, importance="weight")
    store, hooks = record_router_outputs(layers)
    model.train()
    gate_error = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try: model(**_batch(), labels=_batch()["input_ids"], use_cache=False)
            except epng.EPnGError as e:
                if any(map(never_called, store.values())): raise RoutesWithoutRouter(e) from e
                gate_error = e   # 'gate' refuses a router with no known score function: read the rest again
                handle.collector.enabled = False
                for v in store.values(): v.clear()
                for imp in (selection, weight): imp.sums.zero_(); imp.counts.zero_()
                model(**_batch(), labels=_batch()["input_ids"], use_cache=False)
                handle.collector.enabled = True
    finally:
        for h in hooks: h.remove()
        collector.remove(); by_weight.remove()
    kinds = [collector.kinds.get(l.index, "not called") for l in layers]
    calls = {l.index: _cat(store[l.index]) for l in layers}   # None: no call, or the experts ran without the router
    refs = [NEVER_CALLED if never_called(store[l.index]) else "not called" if calls[l.index] is None
            else reference_kind(*calls[l.index], l.routes_by_token) for l in layers]
    row.router, row.reference_router = _collapse(kinds), _collapse(refs)
    chosen = [l for l in layers if calls[l.index] is not None and all(t is not None for t in calls[l.index])]
    departures = [departure(*calls[l.index][0::2]) for l in chosen if not l.routes_by_token]
    row.departure = f"{max(departures):.0%}" if departures else "n/a"
    readings = {"selection": selection.mean(), "weight": weight.mean()}
    if gate_error is None: readings["gate"] = handle.importance.mean()
    else: row.gate = f"refused: {first_sentence(gate_error)}"
    faithful = True
    for importance, table in readings.items():
        rhos = [spearman(table[l.index], reference_reading(calls[l.index], kind, importance, l.num_experts))
                for l, kind in zip(layers, refs) if l in chosen]
        # every layer checked: one whose choice the reference did not see is no layer epng reads faithfully
        ok = len(rhos) == len(layers) and min(rhos) >= 0.99 and (importance != "gate" or kinds == refs)
        faithful &= ok
        text = (f"yes (min ρ {min(rhos):.3f})" if ok else
                f"**NOT faithful** (min ρ {min(rhos):.3f}; epng reads {row.router}, "
                f"the router is {row.reference_router})"
                if rhos else f"**not checked** (no choice seen: {row.reference_router})")
        setattr(row, importance, text)
    row.faithful = faithful

def _cat(calls):
    "One layer's calls as (logits, weights, index) tensors; None when there is no routing call with logits."
    calls = [c for c in calls if c != NEVER_CALLED]
    if not calls: return None
    logits = torch.cat([c[0] for c in calls])
    weights = None if any(c[1] is None for c in calls) else torch.cat([c[1] for c in calls])
    index = None if any(c[2] is None for c in calls) else torch.cat([c[2] for c in calls])
    return logits, weights, index

def check_merge_cycle_peft(row: Row, base, handle) -> None:
    "A cycle keeps the budget; random B: the merged model and the peft reload give the adapted model's logits."
    budget = handle.budget
    handle.cycle(generator=torch.Generator().manual_seed(0))
    ranks = handle.ranks
    row.cycle = (f"ok (budget {budget}, ranks {int(ranks.min())}..{int(ranks.max())})" if int(ranks.sum()) == budget
                 else f"**budget {budget} → {int(ranks.sum())}**")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for lora in handle.loras:
            for b in lora.B.values(): b.copy_(0.02 * torch.randn(b.shape, generator=g))
    batch = _batch(3)
    adapted, plain = _logits(handle.model, batch), _logits(base, batch)
    try:
        merged = _rel(_logits(handle.merged_model(), batch), adapted)
        row.merged = f"{'ok' if merged <= 1e-5 else '**differs**'} ({merged:.0e})"
    except Exception as e: row.merged = f"**fails**: {type(e).__name__}: {first_sentence(e)}"
    if _rel(adapted, plain) < 1e-4: row.notes.append("the random B factors barely change the logits")
    with tempfile.TemporaryDirectory() as tmp:
        try: export_peft(handle, Path(tmp) / "peft")
        except Exception as e:
            row.peft = f"**export fails**: {type(e).__name__}: {first_sentence(e)}"; return
        try: import peft
        except ImportError: row.peft = "exported; reload not checked (no peft)"; return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), Path(tmp) / "peft")
            diff = _rel(_logits(reloaded, batch), adapted)
            row.peft = f"{'ok' if diff <= 1e-4 else '**differs**'} ({diff:.0e})"
        except Exception as e: row.peft = f"**reload fails**: {type(e).__name__}: {first_sentence(e)}"

def check_family(family: str) -> Row:
    "Every check of one family; a failure is recorded in the row, never raised."
    row = Row(family)
    try: model, row.built_with = build_model(family)
    except Exception as e:
        row.attach = f"could not build: {type(e).__name__}: {first_sentence(e)}"; return row
    try:
        layers = epng.find_moe_layers(model)
        learned_looking(model, layers)
        base = copy.deepcopy(model)
        config = epng.EPnGConfig()
        if any(l.gate_up_layout == "up only" for l in layers):   # the default targets name a gate it does not have
            config = epng.EPnGConfig(targets=UP_ONLY_TARGETS)
            row.notes.append(f"experts without a gate: the default targets {epng.EPnGConfig().targets} are refused "
                             f"(a clear error at attach); checked with targets={UP_ONLY_TARGETS}")
        handle = epng.attach(model, config)
    except epng.EPnGError as e:
        row.attach, row.refusal_kind = f"refused: {first_sentence(e)}", type(e).__name__
        note = router_note(model, str(e))
        if note: row.notes.append(f"router refusal: {note}")
        return row
    except Exception as e:
        row.attach = f"**attach crashes**: {type(e).__name__}: {first_sentence(e)}"; return row
    n = len(handle.layers)
    row.attach = f"ok ({n} MoE layer{'s' * (n > 1)} × {handle.layers[0].num_experts} experts)"
    try: check_readings(row, model, handle)
    except RoutesWithoutRouter as e:   # attach succeeds, the first training forward is refused: nothing can be read
        row.attach, row.refusal_kind = f"refused: {first_sentence(e.error)}", type(e.error).__name__
        row.notes.append("attach succeeds; epng refuses the first training forward (the reference saw the experts "
                         "run without a call of the router)")
        return row
    except Exception as e:
        row.notes.append(f"readings crashed: {type(e).__name__}: {first_sentence(e)}")
    try:
        if row.gate.startswith("refused"):   # what a user of this router does: attach with importance='selection'
            row.notes.append("cycle, merge and peft export run under importance='selection' ('gate' is refused)")
            handle = epng.attach(copy.deepcopy(base), epng.EPnGConfig(importance="selection", targets=config.targets))
            handle.model.train()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                handle.model(**_batch(), labels=_batch()["input_ids"], use_cache=False)
        check_merge_cycle_peft(row, base, handle)
    except Exception as e: row.notes.append(f"merge/cycle/peft crashed: {type(e).__name__}: {first_sentence(e)}")
    return row

def router_note(model, message: str) -> str | None:
    "For a refusal about the router's weight: what the block's own router child holds, so the reason can be judged."
    found = re.match(r"(\S+) has fused experts but no child holding a \((\d+), (\d+)\)", message)
    if not found: return None
    block = model.get_submodule(found.group(1))
    routers = [(n, c) for n, c in block.named_children() if "gate" in n or "router" in n]
    if not routers: return f"{found.group(1)} has no child named like a router"
    return "; ".join(f"its child `{n}` ({type(c).__name__}) holds weights "
                     + ", ".join(str(tuple(p.shape)) for _, p in c.named_parameters() if p.dim() == 2)
                     for n, c in routers)

# --- 5. the family's default size, on the meta device ---------------------------------------------------------------

# Families whose defaults cannot be built as they are, even with unset sizes filled; each entry says why.
DEFAULT_OVERRIDES: dict = {
    # the defaults leave layer_types None, which the modeling code indexes per layer: conv and attention alternate
    "lfm2_moe": lambda d: dict(layer_types=[("conv", "full_attention")[i % 2] for i in range(d["num_hidden_layers"])]),
    # the QSA indexer of 'indexed_attention' layers is unset, which the modeling code divides by: the tiny path's
    # sizes, with an index head as wide as the rotary part of the attention head (the config requires it to fit)
    "qwen4_exp_text": lambda d: dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_budget=8, indexer_compress_ratio=2,
                                     indexer_head_dim=int(d["head_dim"] * _partial_rotary(d))),
}

def default_config(family: str):
    """`(config, filled)`: the config of `family` with its own defaults (for most families the released model's shape),
    and `{field: value}` of what had to be filled for it to build: a MoE switched off by default is switched on, a
    size left unset (None) gets the tiny path's value (a head_dim: hidden / heads)."""
    defaults = AutoConfig.for_model(family).to_dict()
    filled = {k: _shrunk(k, v) for k, v in defaults.items() if v is None or v is False}
    filled = {k: v for k, v in filled.items() if v is not None and v is not False}
    hidden, heads = defaults.get("hidden_size"), defaults.get("num_attention_heads")
    if "head_dim" in filled and isinstance(hidden, int) and isinstance(heads, int): filled["head_dim"] = hidden // heads
    filled.update(DEFAULT_OVERRIDES.get(family, lambda d: {})(defaults))
    return AutoConfig.for_model(family, **filled), filled

def meta_causal_lm(family: str, config):
    "The causal LM of `family` for `config` on the meta device (every shape, no memory), as build_model picks its class."
    cls, auto = causal_lm_class(family, type(config), modeling_module(family))
    if auto: return epng.moe.meta_model(config)
    with torch.device("meta"): return cls._from_config(config)

@contextlib.contextmanager
def starting_ranks_on_meta(rank: int):
    """Let `attach` finish on the meta device. The handle reads each layer's ranks by counting `slot_owner`, which a meta
    tensor cannot do; a new pool gives every expert `rank` slots (ExpertLoRA.__init__), so on meta that is the answer."""
    counted = ExpertLoRA.ranks
    ExpertLoRA.ranks = property(lambda self: torch.full((self.num_experts,), rank) if self.slot_owner.is_meta
                                else counted.fget(self))
    try: yield
    finally: ExpertLoRA.ranks = counted

def _shapes(layers) -> str:
    "MoE layers grouped by (E, H, I), in order of first appearance: '27 × (64, 2560, 1536), 1 × (...)'."
    counts = collections.Counter((l.num_experts, l.hidden_size, l.intermediate_size) for l in layers)
    return ", ".join(f"{n} × ({e}, {h}, {i})" for (e, h, i), n in counts.items())

def generation_class(model_type: str):
    "The `*ForConditionalGeneration` class of a model type without a causal LM (a multimodal one), or None."
    module, config_class = modeling_module(model_type), type(AutoConfig.for_model(model_type))
    return next((c for n, c in vars(module or object).items() if inspect.isclass(c) and n.endswith(
        "ForConditionalGeneration") and "PreTrained" not in n and getattr(c, "config_class", None) is config_class), None)

def check_other(model_type: str) -> Row:
    "The default-size check of a module with fused experts but no causal-LM class, on its ForConditionalGeneration."
    row = Row(model_type)
    try: cls = generation_class(model_type)
    except Exception as e: cls, row.default_size = None, f"could not build: {type(e).__name__}: {first_sentence(e)}"
    if cls is None: row.default_size = row.default_size or "not checked: no ForConditionalGeneration class"
    else: row.built_with = cls.__name__; check_default_size(row, cls)
    return row

def _short(value) -> str:
    "A config value for a note: a long per-layer list by its first entries and its length."
    return f"[{', '.join(map(repr, value[:2]))}, … ({len(value)} entries)]" if isinstance(value, list) and len(value) > 4 \
        else repr(value)

def check_default_size(row: Row, model_class=None) -> None:
    """`epng.attach` with the default EPnGConfig on the family's default-size model, built on the meta device (its
    causal LM, or `model_class`): the MoE layers found and their (E, H, I), attach's verdict, and the share of the base
    parameters rank-8 LoRA trains."""
    try:
        config, filled = default_config(row.family)
        if model_class is None: model = meta_causal_lm(row.family, config)
        else:
            with torch.device("meta"): model = model_class._from_config(config)
    except Exception as e:
        row.default_size = f"could not build: {type(e).__name__}: {first_sentence(e)}"; return
    if filled: row.notes.append(f"default size: the defaults leave {', '.join(filled)} unset or off; built with "
                                + ", ".join(f"{k}={_short(v)}" for k, v in filled.items()))
    real = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_meta]
    if real: row.notes.append(f"default size: {len(real)} tensors are not on the meta device ({', '.join(real[:3])})")
    try: layers = epng.find_moe_layers(model)
    except epng.EPnGError as e:
        row.default_size, row.default_refusal = f"refused: {first_sentence(e)}", type(e).__name__; return
    row.default_shapes = [(l.num_experts, l.hidden_size, l.intermediate_size) for l in layers]
    base, settings = epng.moe.count_parameters(model), epng.EPnGConfig()
    if any(l.gate_up_layout == "up only" for l in layers): settings = epng.EPnGConfig(targets=UP_ONLY_TARGETS)
    found = f"{_shapes(layers)}; {base / 1e9:.1f} B"
    try:
        with starting_ranks_on_meta(settings.rank):
            handle = epng.attach(model, settings)
            counted = handle.num_trainable()
    except epng.EPnGError as e:
        row.default_size = f"refused: {first_sentence(e)} ({found})"; row.default_refusal = type(e).__name__; return
    except Exception as e:
        row.default_size = f"**attach crashes**: {type(e).__name__}: {first_sentence(e)} ({found})"; return
    trained = epng.moe.lora_parameters(handle.layers, settings.rank, settings.targets)
    if counted != trained:
        row.notes.append(f"default size: the handle counts {counted:,} trainable parameters, "
                         f"the layers' shapes {trained:,}")
    on = "" if settings.targets == epng.EPnGConfig().targets else " (up+down)"
    row.default_size = f"ok ({found}; {trained / base:.2%}{on})"

# --- 6. the table ---------------------------------------------------------------------------------------------------

COLUMNS = [("family", "family"), ("router", "router kind (epng)"), ("reference_router", "router kind (reference)"),
           ("attach", "attach"), ("gate", "importance 'gate' faithful"),
           ("selection", "importance 'selection' faithful"), ("weight", "importance 'weight' faithful"),
           ("departure", "selection departs from gate"), ("merged", "merged equality"), ("cycle", "cycle keeps budget"),
           ("peft", "peft export"), ("default_size", "default size (meta)")]

def summary(rows: list[Row]) -> list[str]:
    attached = [r for r in rows if r.attach.startswith("ok")]
    refused = {}
    for r in rows:
        if r.attach.startswith("refused"):
            refused.setdefault(r.attach.removeprefix("refused: "), []).append(r.family)
    unbuilt = [r.family for r in rows if r.attach.startswith("could not build")]
    crashed = [r.family for r in rows if r.attach.startswith("**attach crashes")]
    unfaithful = [r.family for r in attached if r.faithful is False]
    unchecked = [r.family for r in attached if r.faithful is None]
    gate_refused = [r.family for r in attached if r.gate.startswith("refused")]
    no_moe = [r.family for r in rows if r.refusal_kind == "NoMoELayerError"]   # every family here has fused experts
    lines = [f"**{len(attached)} of {len(rows)} families attach; refused: {sum(map(len, refused.values()))}; "
             f"could not be built at tiny size: {len(unbuilt)}"
             + (f"; attach crashes on {len(crashed)}: {', '.join(crashed)}" if crashed else "") + ".**", ""]
    lines += by_reason(refused, "Refusals, by reason:")
    if no_moe: lines.append(f"**Refused as having no MoE layer although it has fused experts: {', '.join(no_moe)}.**")
    lines.append("Importance NOT faithful to the router: " + (", ".join(unfaithful) if unfaithful else "none") + ".")
    if unchecked: lines.append(f"**Importance could not be checked (the reading crashed): {', '.join(unchecked)}.**")
    if gate_refused:
        lines.append("importance='gate' refused, because the router weighs its chosen experts by no known score "
                     f"function of its logits (importance='selection' reads it): {', '.join(gate_refused)}.")
    problems = [f"{r.family} ({name})" for r in attached for name in ("merged", "cycle", "peft")
                if not getattr(r, name).startswith(("ok", "exported"))]
    lines.append("Merge, cycle or peft export failing: " + (", ".join(problems) if problems else "none") + ".")
    return lines + default_summary(rows)

def by_reason(refused: dict, title: str) -> list[str]:
    "`title`, then one line per reason naming its families, then a blank line; nothing if none was refused."
    return [title, *(f"- {reason} — {', '.join(fams)}" for reason, fams in refused.items()), ""] if refused else []

def default_summary(rows: list[Row]) -> list[str]:
    "What the default-size check found: attached, refused by reason, unbuilt, MoE layers of different shapes."
    checked = [r for r in rows if r.default_size]
    if not checked: return []
    ok = [r for r in checked if r.default_size.startswith("ok")]
    refused = {}
    for r in checked:
        if r.default_size.startswith("refused"):
            refused.setdefault(re.sub(r" \(\d+ × .*\)$", "", r.default_size.removeprefix("refused: ")), []).append(r.family)
    unbuilt = [r.family for r in checked if r.default_size.startswith("could not build")]
    crashed = [r.family for r in checked if r.default_size.startswith("**attach crashes")]
    mixed = [r.family for r in checked if len(set(r.default_shapes)) > 1]
    by_count = [r.family for r in checked if len({e for e, _, _ in r.default_shapes}) > 1]
    lost = [r.family for r in checked if r.attach.startswith("ok") and not r.default_size.startswith("ok")]
    lines = ["", f"**At default size, on the meta device: {len(ok)} of {len(checked)} families attach; refused: "
             f"{sum(map(len, refused.values()))}; could not be built: {len(unbuilt)}"
             + (f"; attach crashes on {len(crashed)}: {', '.join(crashed)}" if crashed else "") + ".**", ""]
    lines += by_reason(refused, "Refusals at default size, by reason:")
    if unbuilt: lines.append(f"Could not be built at default size: {', '.join(unbuilt)}.")
    lines.append("MoE layers of different (E, H, I) at default size: " + (", ".join(mixed) or "none")
                 + "; of different numbers of experts (which attach refuses): " + (", ".join(by_count) or "none") + ".")
    lines.append("Attach at tiny size but not at default size: " + (", ".join(lost) or "none") + ".")
    return lines

def markdown(rows: list[Row], skipped: dict[str, str], command: str, seconds: float, others=()) -> str:
    cell = lambda v: str(v).replace("|", "\\|") or "—"
    table = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += ["| " + " | ".join(cell(getattr(r, k)) for k, _ in COLUMNS) + " |" for r in rows]
    notes = [f"- {r.family}: built with {r.built_with} (AutoModelForCausalLM does not map it)"
             for r in rows if r.built_with not in ("", "AutoModelForCausalLM")]
    notes += [f"- {r.family}: {n}" for r in rows for n in r.notes]
    return "\n".join([
        "# MoE coverage", "",
        "<!-- Generated by scripts/coverage.py: do not edit by hand, run the script. -->", "",
        "Every transformers model family whose experts use transformers' fused-experts interface "
        "(`use_experts_implementation`) and which has a causal-LM class, as a tiny model (hidden 64, 8 experts, "
        "top-2, two to four layers, fp32 on the CPU; router weights of std 0.15 and, where the router has one, a "
        "correction bias of std 0.3, so that routing looks learned). "
        "Everything below is what this run measured.", "",
        f"- transformers {transformers.__version__}, torch {torch.__version__}, epng {epng.__version__}",
        f"- run on {datetime.date.today().isoformat()} in {seconds:.0f} s", f"- command: `{command}`", "",
        "Columns: *router kind* is the score function epng infers per MoE layer (*reference*: the one the routing "
        "weights are found proportional to by a direct ratio test, written independently of epng; *hash*: a layer "
        "that chooses by token id). *Importance faithful*: Spearman ρ of epng's p̄ against the same quantity "
        "computed from the routing of one training forward, read without epng: the router's logits, and the "
        "weights and experts it chooses, or, for a router that returns only logits, the ones its block hands the "
        "experts (ρ ≥ 0.99 in every layer, and for 'gate' the same router kind). *Selection departs*: the largest share, over layers, of tokens whose chosen "
        "experts are not the top-k of the router's scores (a correction bias or group limit at work; hash layers "
        "left out). *Merged "
        "equality*: max |Δlogits| / max |logits| of `handle.merged_model()` against the adapted model after one "
        "cycle and random B factors (≤ 1e-5). *peft export*: `export_peft`, then the same after reloading with "
        "peft (≤ 1e-4). *Default size (meta)*: the family's config with its own defaults (for most families the "
        "released model's shape; a MoE switched off by default is switched on and sizes left unset are filled, "
        "see the notes), built on the meta device, so that no weight takes memory, and `epng.attach` with the "
        "default EPnGConfig (rank 8 on gate_proj and up_proj); the cell gives the MoE layers found grouped by "
        "(E experts, H hidden, I expert intermediate), the base model's parameters, and the share of them that "
        "rank-8 LoRA on every expert trains.", "",
        *summary(rows), "", *table, "",
        *(["Notes:", *notes, ""] if notes else []),
        *(["Modules with fused experts that are not in the table, and their default size (meta) where they have a "
           "ForConditionalGeneration class:",
           *[f"- {m}: {why}" + ("" if m not in others else "; default size (meta"
                                 + (f", {others[m].built_with}" if others[m].built_with else "")
                                 + f"): {others[m].default_size}") for m, why in skipped.items()],
           *other_summary(others.values()), ""] if skipped else []),
    ])

def other_summary(others) -> list[str]:
    "Which of the modules not in the table have MoE layers of different (E, H, I) at default size, and the notes."
    mixed = [r.family for r in others if len(set(r.default_shapes)) > 1]
    by_count = [r.family for r in others if len({e for e, _, _ in r.default_shapes}) > 1]
    return ["", "Of these, MoE layers of different (E, H, I) at default size: " + (", ".join(mixed) or "none")
            + "; of different numbers of experts: " + (", ".join(by_count) or "none") + ".",
            *[f"- {r.family}: {n}" for r in others for n in r.notes]]

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="*", help="model types to check (default: every family found)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "coverage.md"), help="where to write the table")
    args = parser.parse_args(argv)
    start, verbosity = time.time(), transformers.logging.get_verbosity()
    families, skipped = (args.families, {}) if args.families else moe_families()
    rows = []
    transformers.logging.set_verbosity_error()   # tiny configs make transformers warn about sizes, not our business
    try:
        for family in families:
            t = time.time()
            rows.append(check_family(family))
            check_default_size(rows[-1])
            print(f"{family:28s} {time.time() - t:5.1f}s  {rows[-1].attach[:70]}", file=sys.stderr, flush=True)
        others = {m: check_other(m) for m in skipped}
    finally: transformers.logging.set_verbosity(verbosity)
    command = COMMAND + (f" --families {' '.join(args.families)}" if args.families else "")
    out = Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(rows, skipped, command, time.time() - start, others) + "\n", encoding="utf-8")
    print("\n".join(summary(rows)), file=sys.stderr)
    return rows

if __name__ == "__main__":
    main()
