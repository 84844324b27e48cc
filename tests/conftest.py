"""Shared fixtures: the real SmolLM2 tokenizer (materialised once per machine), tiny random Llamas for unit tests,
one Prefect test server for the flow tests (`harness`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The materialised embedded model is reused across test sessions (it is a pure function of the installed package).
os.environ.setdefault("DPO_MODEL_CACHE", str(REPO / ".dpo_state" / "models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors folder (materialised from the GGUF once)."""
    from dpo_core.models import materialize_embedded

    return materialize_embedded(Path(os.environ["DPO_MODEL_CACHE"]))


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    """The real SmolLM2 tokenizer with its chat template."""
    from dpo_core.config import ModelConfig
    from dpo_core.models import load_tokenizer

    return load_tokenizer(smollm2_dir, ModelConfig())


@pytest.fixture()
def tiny_model(tokenizer):
    """A tiny randomly initialised Llama (float32, eager attention) with the SmolLM2 vocabulary."""
    from dpo_core.models import tiny_llama

    torch.manual_seed(0)
    return tiny_llama(tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama saved as a Hugging Face folder (safetensors + the SmolLM2 tokenizer), for pipeline tests."""
    from dpo_core.models import tiny_llama

    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(tokenizer, seed=0).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    """One Prefect test server for the session (started by the first test that asks for it; each start costs ~10 s),
    with result storage in a temporary folder (not ~/.prefect). Every flow test keeps its state under its tmp_path."""
    results = tmp_path_factory.mktemp("prefect-results")
    old = os.environ.get("PREFECT_RESULTS_LOCAL_STORAGE_PATH")
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(results)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield results
    if old is None:
        os.environ.pop("PREFECT_RESULTS_LOCAL_STORAGE_PATH", None)
    else:
        os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = old
