import os

# No test may reach a model or dataset hub: a stray call fails at once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch
from transformers import AutoModelForCausalLM
import epng


@pytest.fixture
def tiny():
    "A small OLMoE (2 MoE layers × 8 experts) with seeded weights."
    def make(arch="olmoe", **overrides):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(epng.tiny_moe_config(arch, **overrides))
    return make


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a full sweep; runs only with EPNG_SLOW=1")
