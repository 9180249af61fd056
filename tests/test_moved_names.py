"""Names that moved to another module in 0.2 still answer from the old one for a release, with a DeprecationWarning that
names the new place, and they are the very same objects."""
import importlib, warnings
import pytest

MOVED = {  # old module: {name: new module}
    "checkpoint": {n: "io" for n in "atomic_dir write_safetensors atomic_write_json is_stale_temporary remove_stale_temporaries".split()},
    "loop": {n: "io" for n in "flatten_state unflatten_state MAX_STATE_JSON".split()},
    "nano": {**{n: "samples" for n in "DOMAINS NANO_SPLITS nano_task".split()},
             **{n: "eval" for n in "worked_prompts continuation_accuracy nano_eval".split()},
             **{n: "gates" for n in "domain_gate_means js_divergence importance_summary plot_domain_routing".split()}},
    "data": {n: "samples" for n in "synthetic_rows fixture_text write_fixtures".split()},
    "selection": {"EPnGConfig": "config", "MAX_LORA_ALPHA": "config"},
    "growth": {"EPnGHandle": "handle", "attach": "handle"},
    "eval": {n: "judge" for n in "OpenAIJudge judge_pair pairwise_win_rate parse_verdict VerdictError JUDGE_SYSTEM".split()},
}
CASES = [(old, name, new) for old, names in MOVED.items() for name, new in names.items()]


@pytest.mark.parametrize("old,name,new", CASES, ids=[f"{o}.{n}" for o, n, _ in CASES])
def test_moved_name_warns_and_is_the_same_object(old, name, new):
    module = importlib.import_module(f"epng.{old}")
    if name in vars(module):   # the old module imports it for its own use: it answers as before, no warning needed
        value = getattr(module, name)
    else:
        with pytest.warns(DeprecationWarning, match=rf"epng\.{old}\.{name} moved to epng\.{new}"):
            value = getattr(module, name)
    assert value is getattr(importlib.import_module(f"epng.{new}"), name)


def test_unknown_name_still_raises_attribute_error():
    import epng.selection
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"): epng.selection.no_such_name


def test_from_import_of_a_moved_name_warns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from epng.selection import EPnGConfig  # noqa: F401  the 0.1 spelling
    assert any(issubclass(w.category, DeprecationWarning) and "epng.config" in str(w.message) for w in caught)
