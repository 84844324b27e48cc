"""The trainer: bit-exact kill-and-resume, precomputed reference == live reference, accumulation, LoRA, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from dpo_core.checkpoints import list_checkpoints
from dpo_core.config import LOSS_TYPES, LoraConfig, ModelConfig, TrainConfig
from dpo_core.models import DeviceSpec, attach_lora, tiny_llama
from dpo_core.reference import compute_reference_logps
from dpo_core.trainer import NonFiniteError, TrainError, total_steps, train
from faults.inject.step_failure import InjectedFailure, failing

CPU = DeviceSpec(torch.device("cpu"), torch.float32, None, "eager")
TRL_METRICS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "grad_norm", "learning_rate", "tokens_per_second", "step", "epoch"}
TIMING = {"tokens_per_second"}


def _pairs(n: int = 10, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ids = lambda k: rng.integers(20, 2048, size=k).tolist()  # noqa: E731
    return pd.DataFrame([
        {"pair_id": f"p{i}", "split": "train", "prompt_ids": ids(int(rng.integers(3, 12))),
         "chosen_ids": ids(int(rng.integers(2, 14))), "rejected_ids": ids(int(rng.integers(2, 14))),
         "prompt_truncated": False, "chosen_truncated": False, "rejected_truncated": False}
        for i in range(n)
    ])


def _cfg(**kw) -> TrainConfig:
    base = dict(learning_rate=5e-3, batch_size=2, grad_accum=2, epochs=2, warmup_ratio=0.2, checkpoint_every=2,
                keep_checkpoints=2, seed=3, beta=0.5, mega_batch_mult=2)
    return TrainConfig(**{**base, **kw})


class _SmallVocab:
    """The synthetic pairs use ids < 2048: a 2048-token vocabulary keeps checkpoints small and the tests fast."""

    def __init__(self, tokenizer) -> None:
        self.pad_token_id, self.eos_token_id, self.bos_token_id = 0, 1, 1

    def __len__(self) -> int:
        return 2048


def _model(tokenizer, lora: LoraConfig | None = None):
    model = tiny_llama(_SmallVocab(tokenizer), seed=0, hidden_size=32)
    return attach_lora(model, ModelConfig(lora=lora)) if lora else model


def _weights(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.model_dir / "model.safetensors"))


def _strip(history):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4, alpha=8, dropout=0.2)], ids=["full", "lora-dropout"])
def test_kill_and_resume_gives_bit_identical_weights(tmp_path, tokenizer, lora):
    df, cfg = _pairs(), _cfg()
    ref = compute_reference_logps(_model(tokenizer), df, batch_size=4, spec=CPU)
    steps = total_steps(len(df), cfg)
    assert steps == 2 * 3  # ceil(ceil(10 / 2) / 2) per epoch

    straight = train(_model(tokenizer, lora), tokenizer, df, cfg, out_dir=tmp_path / "a", spec=CPU, reference=ref,
                     progress_bar=False)
    with pytest.raises(InjectedFailure, match="after step 4"):
        failing(train, after_step=4)(_model(tokenizer, lora), tokenizer, df, cfg, out_dir=tmp_path / "b", spec=CPU,
                                     reference=ref, progress_bar=False)
    assert [s for s, _ in list_checkpoints(tmp_path / "b" / "checkpoints")] == [2, 4]
    torch.manual_seed(12345)  # a different RNG state in the new "process": the checkpoint must restore it
    resumed = train(_model(tokenizer, lora), tokenizer, df, cfg, out_dir=tmp_path / "b", spec=CPU, reference=ref,
                    progress_bar=False)

    assert resumed.resumed_from_step == 4 and straight.resumed_from_step is None
    assert resumed.steps == straight.steps == steps and resumed.tokens == straight.tokens
    assert _strip(resumed.history) == _strip(straight.history)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    lines = (tmp_path / "b" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, steps + 1))
    assert [s for s, _ in list_checkpoints(tmp_path / "b" / "checkpoints")] == [4, 6]  # every 2 steps + end, keep 2


def test_bco_running_delta_resumes_exactly(tmp_path, tokenizer):
    """BCO's reward shift is the mean reward of all earlier steps; the checkpoint keeps it, so a resumed run uses the
    same shifts and ends with the same weights."""
    df, cfg = _pairs(), _cfg(loss="bco_pair", bco_running_delta=True)
    # a reference other than the initial policy, so that rewards (and shifts) are not 0 from the start
    ref = compute_reference_logps(tiny_llama(_SmallVocab(tokenizer), seed=1, hidden_size=32), df, batch_size=4,
                                  spec=CPU)
    straight = train(_model(tokenizer), tokenizer, df, cfg, out_dir=tmp_path / "a", spec=CPU, reference=ref,
                     progress_bar=False)
    deltas = [row["bco/delta"] for row in straight.history]
    assert deltas[0] == 0.0 and all(d != 0.0 for d in deltas[1:])
    # step 2's delta is step 1's mean reward: (chosen + rejected) / 2
    first = straight.history[0]
    assert deltas[1] == pytest.approx((first["rewards/chosen"] + first["rewards/rejected"]) / 2, rel=1e-6)
    with pytest.raises(InjectedFailure):
        failing(train, after_step=4)(_model(tokenizer), tokenizer, df, cfg, out_dir=tmp_path / "b", spec=CPU,
                                     reference=ref, progress_bar=False)
    resumed = train(_model(tokenizer), tokenizer, df, cfg, out_dir=tmp_path / "b", spec=CPU, reference=ref,
                    progress_bar=False)
    assert resumed.resumed_from_step == 4
    assert _strip(resumed.history) == _strip(straight.history)
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_crash_between_checkpoints_replays_from_the_last_one(tmp_path, tokenizer):
    """A crash after step 5 (last checkpoint: step 4) loses step 5; the resumed run redoes it identically."""
    df, cfg = _pairs(), _cfg()
    ref = compute_reference_logps(_model(tokenizer), df, batch_size=4, spec=CPU)
    straight = train(_model(tokenizer), tokenizer, df, cfg, out_dir=tmp_path / "a", spec=CPU, reference=ref,
                     progress_bar=False)

    def crash(metrics):
        if metrics["step"] == 5:
            raise KeyboardInterrupt("simulated kill after step 5")

    with pytest.raises(KeyboardInterrupt):
        train(_model(tokenizer), tokenizer, df, cfg, out_dir=tmp_path / "b", spec=CPU, reference=ref, on_step=crash,
              progress_bar=False)
    assert [s for s, _ in list_checkpoints(tmp_path / "b" / "checkpoints")] == [2, 4]
    resumed = train(_model(tokenizer), tokenizer, df, cfg, out_dir=tmp_path / "b", spec=CPU, reference=ref,
                    progress_bar=False)
    assert resumed.resumed_from_step == 4
    assert _strip(resumed.history) == _strip(straight.history)
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[name], b[name]) for name in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7)), "the lost step 5 is not recorded twice"


def test_precomputed_reference_equals_live_reference_model(tmp_path, tokenizer):
    df, cfg = _pairs(8), _cfg(epochs=1, checkpoint_every=100)
    table = compute_reference_logps(_model(tokenizer), df, batch_size=3, spec=CPU)
    runs = {
        "table": train(_model(tokenizer), tokenizer, df, cfg, out_dir=tmp_path / "t", spec=CPU, reference=table,
                       progress_bar=False),
        "live": train(_model(tokenizer), tokenizer, df, cfg, out_dir=tmp_path / "l", spec=CPU,
                      ref_model=_model(tokenizer), progress_bar=False),
        "initial-policy": train(_model(tokenizer), tokenizer, df, cfg, out_dir=tmp_path / "i", spec=CPU,
                                progress_bar=False),
    }
    assert (tmp_path / "i" / "reference.parquet").is_file()
    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "grad_norm"]
    expected = [[row[k] for k in keys] for row in runs["table"].history]
    assert len(expected) == 2 and expected[0][0] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference at first
    for name in ("live", "initial-policy"):
        got = [[row[k] for k in keys] for row in runs[name].history]
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5, err_msg=name)


def test_gradient_accumulation_matches_a_big_batch(tmp_path, tokenizer):
    df = _pairs(8)
    common = dict(epochs=1, length_grouping=False, checkpoint_every=100, max_grad_norm=None)
    big = train(_model(tokenizer), tokenizer, df, _cfg(batch_size=4, grad_accum=1, **common), out_dir=tmp_path / "a",
                spec=CPU, progress_bar=False)
    acc = train(_model(tokenizer), tokenizer, df, _cfg(batch_size=2, grad_accum=2, **common), out_dir=tmp_path / "b",
                spec=CPU, progress_bar=False)
    assert big.steps == acc.steps == 2
    np.testing.assert_allclose([r["loss"] for r in acc.history], [r["loss"] for r in big.history], rtol=1e-5)
    a, b = _weights(big), _weights(acc)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_every_batch_layout_trains_like_padded_rows(tmp_path, tokenizer, layout):
    """Same data order, same loss curve and weights whatever the layout (padded rows, one packed row, or one
    shared-prompt row per pair); the auto layout of this eager-attention model is the shared-prompt one."""
    df = _pairs(8)
    runs = [train(_model(tokenizer), tokenizer, df, _cfg(epochs=1, checkpoint_every=100, batch_layout=kind),
                  out_dir=tmp_path / kind, spec=CPU, progress_bar=False) for kind in ("padded", layout)]
    padded, packed = runs
    assert packed.tokens == padded.tokens  # the same trained tokens are counted in every layout
    for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in packed.history], [r[key] for r in padded.history], rtol=1e-5,
                                   atol=1e-6, err_msg=key)
    a, b = _weights(padded), _weights(packed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)


def test_metrics_schedule_and_gradient_checkpointing(tmp_path, tokenizer):
    df, cfg = _pairs(8), _cfg(epochs=1, batch_size=2, grad_accum=1, schedule="linear", warmup_ratio=0.25,
                              checkpoint_every=100, sft_weight=0.5)
    seen = []
    plain = train(_model(tokenizer), tokenizer, df, cfg, out_dir=tmp_path / "a", spec=CPU, on_step=seen.append,
                  progress_bar=False)
    assert plain.steps == 4 and len(seen) == 4 and seen == plain.history
    for row in plain.history:
        assert TRL_METRICS <= row.keys() and "loss/sft" in row and "loss/sigmoid" in row
        assert all(np.isfinite(v) for v in row.values())
        assert row["tokens_per_second"] > 0 and row["grad_norm"] > 0
    lrs = [row["learning_rate"] for row in plain.history]
    assert lrs == pytest.approx([0.0, 5e-3, 5e-3 * 2 / 3, 5e-3 / 3])  # 1 warmup step, then linear decay
    assert [row["epoch"] for row in plain.history] == [0.25, 0.5, 0.75, 1.0]
    lengths = df.apply(lambda r: 2 * len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids), axis=1)
    assert plain.tokens == int(lengths.sum())

    assert cfg.gradient_checkpointing == "selective" and cfg.trim_heap  # the defaults
    variants = {"full checkpointing": {"gradient_checkpointing": True},
                "no checkpointing, heap not trimmed": {"gradient_checkpointing": False, "trim_heap": False}}
    for mode, update in variants.items():  # the default run above: selective checkpointing, heap trimmed
        checkpointed = train(_model(tokenizer), tokenizer, df, cfg.model_copy(update=update),
                             out_dir=tmp_path / f"b-{len(update)}", spec=CPU, progress_bar=False)
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose([r[key] for r in checkpointed.history], [r[key] for r in plain.history],
                                       rtol=1e-5, err_msg=f"{mode}: {key}")


def test_lora_reference_is_the_model_with_adapters_disabled(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    df, cfg = _pairs(6), _cfg(epochs=1, checkpoint_every=100, learning_rate=5e-2, warmup_ratio=0.0)
    model = _model(tokenizer, LoraConfig(r=4, alpha=8))
    result = train(model, tokenizer, df, cfg, out_dir=tmp_path, spec=CPU, progress_bar=False)
    first = result.history[0]
    # LoRA's B starts at zero: policy == reference on the first step
    assert first["rewards/chosen"] == 0.0 and first["loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert result.history[-1]["rewards/margins"] != 0.0
    assert not (tmp_path / "reference.parquet").exists(), "no table computed: adapters-off is the reference"
    merged = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([df["prompt_ids"][0] + df["chosen_ids"][0]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model.eval()(ids).logits, atol=1e-4, rtol=1e-4)


LN2 = 0.6931471805599453
# each objective's loss when policy == reference (every log-ratio 0) at beta = 0.5; None: it reads the policy's
# log-probs themselves (reference-free)
AT_START = {"sigmoid": LN2, "robust": LN2, "sigmoid_norm": LN2, "aot": LN2, "aot_unpaired": LN2,
            "ipo": 1.0,  # (0 - 1 / (2 beta))^2
            "hinge": 1.0, "apo_zero": 1.0, "apo_down": 1.0,  # max(0, 1 - 0); 1 - 1/2 + 1/2; 1/2 + 1 - 1/2
            # L(0) (1 + 1/2 + 1/2); 2 L(0); 2 (1 / (2 beta))^2
            "nca_pair": 2 * LN2, "bco_pair": 2 * LN2, "sppo_hard": 2.0,
            "discopop": (LN2 + 1) / 2,  # m = sigma(0) = 1/2: (L(0) + e^0) / 2
            "exo_pair": 1.6144630803608508,  # eps = 0.01: (log 1/2 - log 0.99) / 2 + (log 1/2 - log 0.01) / 2
            "simpo": None, "sft": None, "orpo": None, "cpo": None,
            "kto": 0.5}  # every row 1 - sigma(beta (0 - z_0)), z_0 = max(0, 0)
SETTINGS = {"robust": {"label_smoothing": 0.1}, "sigmoid_norm": {"label_smoothing": 0.1},
            "exo_pair": {"label_smoothing": 0.01},
            # DiscoPOP's loss is lowest at a small negative margin (its slope at z = 0 is positive): a smaller step
            # keeps three steps from overshooting it
            "discopop": {"learning_rate": 1e-4}}


@pytest.mark.parametrize("loss", LOSS_TYPES)
def test_every_loss_trains(tmp_path, tokenizer, loss):
    """The objective that ran is the one asked for (its own metric, and its value where policy == reference), and
    three steps on the same four pairs lower it."""
    cfg = _cfg(**{"loss": loss, "epochs": 1, "max_steps": 3, "checkpoint_every": 100, "warmup_ratio": 0.0,
                  "learning_rate": 1e-3, **SETTINGS.get(loss, {})})
    # KTO trains on unpaired rows: the pairs' rows as (prompt, completion, KL completion) with a label each
    data = _pairs(4).assign(label=[True, False, True, False]) if loss == "kto" else _pairs(4)
    result = train(_model(tokenizer), tokenizer, data, cfg, out_dir=tmp_path, spec=CPU, progress_bar=False)
    own = [row[f"loss/{loss}"] for row in result.history]
    assert result.steps == 3 and all(np.isfinite(own))
    assert (tmp_path / "reference.parquet").is_file() == cfg.needs_reference()  # none scored for a reference-free one
    assert [row["loss"] for row in result.history] == own  # a single objective is the whole loss
    assert [k for k in result.history[0] if k.startswith("loss/")] == [f"loss/{loss}"]
    if AT_START[loss] is not None:
        assert own[0] == pytest.approx(AT_START[loss], abs=1e-5)
    assert own[-1] < own[0] - 1e-4, own


def test_a_mixture_logs_every_component_and_trains_on_their_weighted_sum(tmp_path, tokenizer):
    cfg = _cfg(loss=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], epochs=1, max_steps=3,
               checkpoint_every=100, warmup_ratio=0.0, learning_rate=1e-3)
    result = train(_model(tokenizer), tokenizer, _pairs(4), cfg, out_dir=tmp_path, spec=CPU, progress_bar=False)
    for row in result.history:
        parts = 0.8 * row["loss/sigmoid"] + 0.2 * row["loss/bco_pair"] + 1.0 * row["loss/sft"]
        assert row["loss"] == pytest.approx(parts, rel=1e-6)
    first, last = result.history[0], result.history[-1]
    assert (first["loss/sigmoid"], first["loss/bco_pair"]) == pytest.approx((LN2, 2 * LN2), abs=1e-5)
    assert last["loss"] < first["loss"] and last["loss/sft"] < first["loss/sft"]


def test_wpo_weights_each_pair_by_the_policys_own_probability(tmp_path, tokenizer):
    """At the first step (policy == reference: every sigmoid loss is log 2) the WPO loss is log 2 times the mean
    weight, the weights being the policy's own mean token probabilities relative to sum_v p_v^2."""
    from dpo_core.batching import collate_pairs
    from dpo_core.logprobs import sequence_scores, split_pair_logps
    from dpo_core.losses import wpo_weights

    df = _pairs(4)
    cfg = _cfg(use_weighting=True, epochs=1, max_steps=3, checkpoint_every=100, warmup_ratio=0.0,
               learning_rate=1e-3)
    with torch.no_grad():
        scores = sequence_scores(_model(tokenizer).eval(), collate_pairs(df.to_dict("records"), 0), wpo=True)
    weights = wpo_weights(*split_pair_logps(scores.wpo_logps), *split_pair_logps(scores.counts))
    assert float(weights.max() / weights.min()) > 1.01  # the pairs weigh differently
    result = train(_model(tokenizer), tokenizer, df, cfg, out_dir=tmp_path, spec=CPU, progress_bar=False)
    assert result.history[0]["loss"] == pytest.approx(LN2 * float(weights.mean()), rel=1e-5)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_ld_dpo_reference_table_equals_live_reference_and_alpha_one_is_dpo(tmp_path, tokenizer):
    """LD-DPO reweights the reference too: the precomputed table (its shared-length columns) and a live reference
    model give the same run; ld_alpha = 1 is plain DPO; another alpha trains differently."""
    df = _pairs(8)
    other = tiny_llama(_SmallVocab(tokenizer), seed=1, hidden_size=32)  # a reference that is not the initial policy
    table = compute_reference_logps(other, df, batch_size=3, spec=CPU)
    keys = ["loss", "rewards/chosen", "rewards/rejected", "grad_norm"]

    def run(name, **kw):
        cfg = _cfg(epochs=1, checkpoint_every=100, **kw)
        source = {"ref_model": other} if name == "live" else {"reference": table}
        result = train(_model(tokenizer), tokenizer, df, cfg, out_dir=tmp_path / name, spec=CPU, progress_bar=False,
                       **source)
        return np.array([[row[k] for k in keys] for row in result.history])

    table_run, live_run = run("table", ld_alpha=0.5), run("live", ld_alpha=0.5)
    np.testing.assert_allclose(live_run, table_run, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(run("one", ld_alpha=1.0), run("dpo"), atol=1e-6, rtol=1e-6)
    assert np.abs(table_run[0] - run("dpo2")[0]).max() > 1e-3


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tokenizer):
    model = _model(tokenizer)

    def poison(metrics):
        if metrics["step"] == 2:
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteError, match="optimizer step 3") as err:
        train(model, tokenizer, _pairs(), _cfg(checkpoint_every=1), out_dir=tmp_path, spec=CPU, on_step=poison,
              progress_bar=False)
    assert err.value.step == 3 and "step-000002" in str(err.value)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [1, 2]
    good = load_file(str(tmp_path / "checkpoints" / "step-000002" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())


def test_bad_inputs_are_clear_errors(tmp_path, tokenizer):
    model, df = _model(tokenizer), _pairs(4)
    with pytest.raises(TrainError, match="training set is empty"):
        train(model, tokenizer, df.iloc[:0], _cfg(), out_dir=tmp_path, spec=CPU)
    with pytest.raises(TrainError, match="missing column"):
        train(model, tokenizer, df.drop(columns=["chosen_ids"]), _cfg(), out_dir=tmp_path, spec=CPU)
    ref = compute_reference_logps(model, df.iloc[:2], batch_size=2, spec=CPU)
    with pytest.raises(TrainError, match="lacks 2 of 4 training pairs"):
        train(model, tokenizer, df, _cfg(), out_dir=tmp_path, spec=CPU, reference=ref)
    with pytest.raises(TrainError, match="not both"):
        train(model, tokenizer, df, _cfg(), out_dir=tmp_path, spec=CPU, reference=ref, ref_model=model)
    with pytest.raises(TrainError, match="duplicated pair_id"):
        train(model, tokenizer, pd.concat([df, df]), _cfg(), out_dir=tmp_path, spec=CPU)
    # checkpoints of one run are not resumed by another
    train(model, tokenizer, df, _cfg(max_steps=1), out_dir=tmp_path / "run", spec=CPU, progress_bar=False)
    with pytest.raises(TrainError, match="different run"):
        train(_model(tokenizer), tokenizer, df, _cfg(max_steps=1, beta=0.2), out_dir=tmp_path / "run", spec=CPU)


def _with_validation(n_train: int = 10, n_val: int = 6):
    """Training pairs and validation pairs (other ids, split `validation`) with one reference table for both."""
    df = _pairs(n_train)
    val = _pairs(n_val, seed=1).assign(pair_id=lambda d: "v" + d["pair_id"], split="validation")
    return df, val


VAL_KEYS = {"val/loss", "val/rewards/chosen", "val/rewards/rejected", "val/rewards/accuracies", "val/rewards/margins",
            "val/logps/chosen", "val/logps/rejected"}


def test_validation_scoring_changes_nothing_but_the_history(tmp_path, tokenizer):
    df, val = _with_validation()
    ref = compute_reference_logps(_model(tokenizer), pd.concat([df, val]), batch_size=4, spec=CPU)
    plain = train(_model(tokenizer), tokenizer, df, _cfg(), out_dir=tmp_path / "a", spec=CPU, reference=ref,
                  progress_bar=False)
    scored = train(_model(tokenizer), tokenizer, df, _cfg(eval_every=2), out_dir=tmp_path / "b", spec=CPU,
                   reference=ref, validation=val, progress_bar=False)
    a, b = _weights(plain), _weights(scored)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert scored.selected_step == scored.steps == 6
    assert [r["step"] for r in scored.history if VAL_KEYS <= set(r)] == [2, 4, 6]
    first = scored.history[1]
    # the policy after step 2 scored against the reference: the same maths as the training metrics
    assert first["val/rewards/margins"] == pytest.approx(first["val/rewards/chosen"] - first["val/rewards/rejected"])
    assert 0.0 <= first["val/rewards/accuracies"] <= 1.0 and first["val/loss"] > 0
    # without eval_every the validation split is still scored once, after the last step
    last_only = train(_model(tokenizer), tokenizer, df, _cfg(), out_dir=tmp_path / "c", spec=CPU, reference=ref,
                      validation=val, progress_bar=False)
    assert [r["step"] for r in last_only.history if "val/loss" in r] == [6]


def test_best_val_outputs_the_best_scored_checkpoint_and_resumes_exactly(tmp_path, tokenizer):
    df, val = _with_validation()
    ref = compute_reference_logps(_model(tokenizer), pd.concat([df, val]), batch_size=4, spec=CPU)
    cfg = _cfg(eval_every=1, select="best_val", select_metric="val/loss", learning_rate=5e-2, checkpoint_every=4,
               keep_checkpoints=1)
    straight = train(_model(tokenizer), tokenizer, df, cfg, out_dir=tmp_path / "a", spec=CPU, reference=ref,
                     validation=val, progress_bar=False)
    losses = {r["step"]: r["val/loss"] for r in straight.history}
    assert sorted(losses) == list(range(1, straight.steps + 1))
    best = min(losses, key=lambda s: (losses[s], s))
    assert straight.selected_step == best and best != straight.steps  # this run overshoots: the best is not the last
    # the output weights are the best step's checkpoint, kept past keep_checkpoints=1
    kept = [s for s, _ in list_checkpoints(tmp_path / "a" / "checkpoints")]
    assert kept == sorted({best, straight.steps})
    best_weights = load_file(str(tmp_path / "a" / "checkpoints" / f"step-{best:06d}" / "model.safetensors"))
    final = _weights(straight)
    assert all(torch.equal(final[name], best_weights[name]) for name in best_weights)
    last = train(_model(tokenizer), tokenizer, df, cfg.model_copy(update={"select": "last"}),
                 out_dir=tmp_path / "last", spec=CPU, reference=ref, validation=val, progress_bar=False)
    last_weights = _weights(last)
    assert last.selected_step == last.steps and any(not torch.equal(final[n], last_weights[n]) for n in final)

    with pytest.raises(InjectedFailure):  # eval_every=1 with best_val: every step has a checkpoint
        failing(train, after_step=best + 1)(_model(tokenizer), tokenizer, df, cfg, out_dir=tmp_path / "b", spec=CPU,
                                            reference=ref, validation=val, progress_bar=False)
    resumed = train(_model(tokenizer), tokenizer, df, cfg, out_dir=tmp_path / "b", spec=CPU, reference=ref,
                    validation=val, progress_bar=False)
    assert resumed.resumed_from_step == best + 1 and resumed.selected_step == best
    assert _strip(resumed.history) == _strip(straight.history)
    resumed_weights = _weights(resumed)
    assert all(torch.equal(final[name], resumed_weights[name]) for name in final)


def test_best_val_with_checkpoints_before_the_first_validation_scoring(tmp_path, tokenizer):
    """Checkpoints more often than validation (the shipped default: checkpoint_every 8, eval_every 32): a checkpoint
    written before anything was scored keeps no best step, and the run still outputs its best scored checkpoint."""
    df, val = _with_validation()
    ref = compute_reference_logps(_model(tokenizer), pd.concat([df, val]), batch_size=4, spec=CPU)
    cfg = _cfg(eval_every=3, select="best_val", select_metric="val/loss", learning_rate=5e-2, checkpoint_every=1,
               keep_checkpoints=1)
    result = train(_model(tokenizer), tokenizer, df, cfg, out_dir=tmp_path / "a", spec=CPU, reference=ref,
                   validation=val, progress_bar=False)
    scored = {r["step"]: r["val/loss"] for r in result.history if "val/loss" in r}
    assert sorted(scored) == [3, 6] and result.steps == 6
    assert result.selected_step == min(scored, key=lambda s: (scored[s], s))
    kept = [s for s, _ in list_checkpoints(tmp_path / "a" / "checkpoints")]
    assert kept == sorted({result.selected_step, 6})


def test_validation_errors_are_clear(tmp_path, tokenizer):
    df, val = _with_validation(4, 2)
    with pytest.raises(TrainError, match="need validation pairs"):
        train(_model(tokenizer), tokenizer, df, _cfg(eval_every=1), out_dir=tmp_path / "a", spec=CPU)
    with pytest.raises(TrainError, match="also training pairs"):
        train(_model(tokenizer), tokenizer, df, _cfg(eval_every=1), out_dir=tmp_path / "b", spec=CPU,
              validation=df.iloc[:1])
    with pytest.raises(TrainError, match="no training step was scored"):
        from dpo_core.trainer import best_validation_step

        best_validation_step([{"step": 1, "loss": 0.7}], "val/loss")


def test_patience_stops_early_on_validation_and_a_resumed_run_stays_stopped(tmp_path, tokenizer):
    df, val = _with_validation()
    ref = compute_reference_logps(_model(tokenizer), pd.concat([df, val]), batch_size=4, spec=CPU)
    cfg = _cfg(eval_every=1, select="best_val", select_metric="val/loss", learning_rate=5e-2, checkpoint_every=4,
               keep_checkpoints=1)
    full = train(_model(tokenizer), tokenizer, df, cfg, out_dir=tmp_path / "full", spec=CPU, reference=ref,
                 validation=val, progress_bar=False)
    # where patience 1 stops: the first scoring that does not improve on the best so far (lower val/loss)
    best_so_far, stop, best_at_stop = float("inf"), None, None
    for row in full.history:
        if row["val/loss"] < best_so_far:
            best_so_far, best_step = row["val/loss"], row["step"]
        elif stop is None:
            stop, best_at_stop = row["step"], best_step
    assert stop is not None and stop < full.steps  # this run overshoots, so patience has something to stop

    early = train(_model(tokenizer), tokenizer, df, cfg.model_copy(update={"patience": 1}), out_dir=tmp_path / "e",
                  spec=CPU, reference=ref, validation=val, progress_bar=False)
    assert early.steps == stop and early.selected_step == best_at_stop
    assert _strip(early.history) == _strip(full.history[:stop])
    kept = load_file(str(tmp_path / "e" / "checkpoints" / f"step-{best_at_stop:06d}" / "model.safetensors"))
    final = _weights(early)
    assert all(torch.equal(final[name], kept[name]) for name in kept)
    again = train(_model(tokenizer), tokenizer, df, cfg.model_copy(update={"patience": 1}), out_dir=tmp_path / "e",
                  spec=CPU, reference=ref, validation=val, progress_bar=False)
    assert again.resumed_from_step == stop and again.steps == stop and again.selected_step == best_at_stop


def test_kto_raises_desirable_rewards_lowers_undesirable_ones_and_logs_the_kl(tmp_path, tokenizer):
    """A few KTO steps on labelled rows: the desirable rows' mean reward goes up, the undesirable rows' down, the
    accuracy (reward sign = label) up; ``kl`` is logged (0 at the first step: policy == reference); the validation
    rows are scored with the same definitions."""
    rows = _pairs(8, seed=1).assign(label=[True, False] * 4)
    val = _pairs(4, seed=2).assign(pair_id=lambda d: "v" + d["pair_id"], label=[True, False] * 2)
    cfg = _cfg(loss="kto", epochs=1, max_steps=4, batch_size=8, grad_accum=1, checkpoint_every=100,
               warmup_ratio=0.0, learning_rate=1e-3, desirable_weight=1.2)
    result = train(_model(tokenizer), tokenizer, rows, cfg, out_dir=tmp_path, spec=CPU, validation=val,
                   progress_bar=False)
    first, last = result.history[0], result.history[-1]
    assert first["kl"] == 0.0 and first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx((1.2 * 0.5 + 0.5) / 2, abs=1e-6)  # lambda_D = 1.2 on half the rows
    assert last["rewards/chosen"] > 0 > last["rewards/rejected"]
    assert last["rewards/accuracies"] > first["rewards/accuracies"] and last["loss"] < first["loss"]
    assert {"val/loss", "val/rewards/chosen", "val/rewards/accuracies", "val/kl"} <= set(last)
    assert "kl" in last and np.isfinite(last["kl"]) and last["kl"] >= 0.0


def test_kto_needs_labelled_rows_and_labelled_rows_need_kto(tmp_path, tokenizer):
    with pytest.raises(TrainError, match="train.loss=kto trains on unpaired KTO rows"):
        train(_model(tokenizer), tokenizer, _pairs(4), _cfg(loss="kto"), out_dir=tmp_path, spec=CPU,
              progress_bar=False)
    with pytest.raises(TrainError, match="needs pairs: use train.loss=kto"):
        train(_model(tokenizer), tokenizer, _pairs(4).assign(label=True), _cfg(), out_dir=tmp_path, spec=CPU,
              progress_bar=False)
