"""The real thing: a few DPO steps of the embedded SmolLM2-135M-Instruct on shipped UltraFeedback pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from dpo_core import trainer
from dpo_core.config import LOSS_TYPES, ModelConfig, TrainConfig
from dpo_core.models import load_model, load_tokenizer, pick_device
from dpo_core.reference import compute_reference_logps
from dpo_core.templating import tokenize_pairs
from dpo_core.trainer import train

REPO = Path(__file__).resolve().parents[1]
N_PAIRS = 4  # one batch; ~8 pairs x 128 tokens took ~100 s per step on a loaded 2-core machine


def _shipped_pairs(n: int) -> pd.DataFrame:
    lines = (REPO / "data" / "ultrafeedback_binarized_sample" / "train.jsonl").read_text().splitlines()[:n]
    rows = [json.loads(line) for line in lines]
    return pd.DataFrame({
        "pair_id": [f"uf{i}" for i in range(n)],
        "prompt": [[{"role": "user", "content": r["prompt"]}] for r in rows],
        "chosen": [r["chosen"] for r in rows],
        "rejected": [r["rejected"] for r in rows],
    })


@pytest.mark.slow
def test_dpo_steps_on_smollm2_raise_reward_accuracy_and_margin(smollm2_dir, tmp_path):
    mcfg = ModelConfig(num_threads=None)
    spec = pick_device(mcfg)
    tokenizer = load_tokenizer(smollm2_dir, mcfg)
    tokenized, report = tokenize_pairs(_shipped_pairs(N_PAIRS), tokenizer, max_length=128, max_prompt_length=64)
    assert report.tokenized == N_PAIRS
    model = load_model(smollm2_dir, mcfg, spec)
    reference = compute_reference_logps(model, tokenized, batch_size=N_PAIRS, spec=spec)
    # the same batch twice: step 1 scores the untouched policy (== reference), step 2 the policy after one update
    cfg = TrainConfig(learning_rate=5e-5, beta=0.1, batch_size=N_PAIRS, epochs=2, warmup_ratio=0.0,
                      schedule="constant", checkpoint_every=100)
    result = train(model, tokenizer, tokenized, cfg, out_dir=tmp_path, spec=spec, reference=reference)
    first, last = result.history[0], result.history[-1]
    print({k: [round(r[k], 4) for r in result.history] for k in ("loss", "rewards/accuracies", "rewards/margins")})
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-3)  # policy == reference before the first update
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert last["rewards/margins"] > first["rewards/margins"] + 0.05
    assert last["rewards/accuracies"] >= 0.75 > first["rewards/accuracies"]
    assert last["loss"] < first["loss"]
    assert (result.model_dir / "model.safetensors").is_file() and result.steps == 2


# the settings an objective cannot run without (the same as tests/test_trainer.py's), and smaller steps where a 5e-5
# Adam step on sums of token log-ratios overshoots the minimum: DiscoPOP's (a small negative margin; 0.85 -> 2.0 at
# 1e-5) and SPPO's squared targets +-1/(2 beta)
OBJECTIVE_SETTINGS = {"robust": {"label_smoothing": 0.1}, "sigmoid_norm": {"label_smoothing": 0.1},
                      "exo_pair": {"label_smoothing": 0.01}, "discopop": {"learning_rate": 1e-6},
                      "sppo_hard": {"learning_rate": 5e-6}}


@pytest.fixture(scope="module")
def smollm2_batch(smollm2_dir):
    """Two shipped pairs, tokenized short, the embedded model (loaded once) with its untouched weights, and its
    reference log-probs: shared by every objective, which restores the weights before it trains."""
    mcfg = ModelConfig(num_threads=None)
    spec = pick_device(mcfg)
    tokenizer = load_tokenizer(smollm2_dir, mcfg)
    # 32 prompt + 32 answer tokens: the 19 runs cost their forward and backward passes, which scale with length
    tokenized, _ = tokenize_pairs(_shipped_pairs(2), tokenizer, max_length=64, max_prompt_length=32)
    model = load_model(smollm2_dir, mcfg, spec)
    reference = compute_reference_logps(model, tokenized, batch_size=2, spec=spec)
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    return model, initial, spec, tokenizer, tokenized, reference


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSS_TYPES)
def test_every_objective_lowers_its_own_loss_on_smollm2(smollm2_batch, tmp_path, monkeypatch, loss):
    """Three steps of each objective on the same two shipped pairs with the embedded model lower that objective's
    own metric (`loss/<name>`); KTO gets the pairs' rows labelled desirable / undesirable."""
    model, initial, spec, tokenizer, tokenized, reference = smollm2_batch
    model.load_state_dict(initial)  # the untouched embedded model, whichever objective trained it before
    # Only the loss curve is checked here: the last step's checkpoint (weights + AdamW state, ~1.6 GB) and the final
    # model folder (~0.5 GB) are not written (that is tested in test_checkpoints.py and in the test above).
    monkeypatch.setattr(trainer, "save_checkpoint", lambda root, step, **kwargs: None)
    monkeypatch.setattr(trainer, "_save_final", lambda model, tokenizer, target, tensors=None: target)
    data = tokenized.assign(label=[True, False]) if loss == "kto" else tokenized
    cfg = TrainConfig(**{"loss": loss, "learning_rate": 5e-5, "beta": 0.1, "batch_size": 2, "epochs": 3,
                         "warmup_ratio": 0.0, "schedule": "constant", "checkpoint_every": 100,
                         **OBJECTIVE_SETTINGS.get(loss, {})})
    result = train(model, tokenizer, data, cfg, out_dir=tmp_path / "out", spec=spec,
                   reference=reference if cfg.needs_reference() else None, progress_bar=False)
    own = [row[f"loss/{loss}"] for row in result.history]
    print(loss, [round(v, 5) for v in own])
    assert result.steps == 3 and own[-1] < own[0], own
