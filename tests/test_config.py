"""The run configuration: loss names and the settings each loss reads are checked when a config loads."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dpo_core.config import LOSS_SETTINGS, LOSS_TYPES, TrainConfig, load_config


@pytest.mark.parametrize("overrides, message", [
    (["train.loss=ipo", "train.label_smoothing=0.1"], "label_smoothing=0.1 has no meaning for loss 'ipo'"),
    (["train.loss=hinge", "train.label_smoothing=0.2"], "label_smoothing=0.2 has no meaning for loss 'hinge'"),
    (["train.simpo_gamma=1.0"], "simpo_gamma=1.0 has no meaning for loss 'sigmoid'"),
    (["train.loss=bco_pair", "train.f_divergence=js"], "f_divergence=js has no meaning for loss 'bco_pair'"),
    (["train.loss=sigmoid", "train.discopop_tau=0.1"], "discopop_tau=0.1 has no meaning for loss 'sigmoid'"),
    (["train.f_alpha=0.3"], "f_alpha=0.3 is read only with f_divergence=alpha"),
    (["train.loss=exo_pair"], "'exo_pair' needs label_smoothing > 0"),
    (["train.bco_running_delta=true"], "bco_running_delta=true has no meaning for loss 'sigmoid'"),
    (["train.loss=[sigmoid, ipo]", "train.loss_weights=[1.0]"], "1 weight\\(s\\) for 2 loss\\(es\\)"),
    (["train.loss=[sigmoid, sigmoid]"], "names an objective twice"),
    (["train.loss=[sigmoid, sft]", "train.loss_weights=[1.0, 0.0]"], "must all be > 0"),
    (["train.loss=[sigmoid, sft]", "train.sft_weight=0.5"], "sft_weight and the `sft` loss are the same term"),
    (["train.loss=[]"], "empty list"),
    (["train.loss=aot", "train.use_weighting=true"], "use_weighting has no meaning for aot"),
    (["train.ld_alpha=1.5"], "less than or equal to 1"),
    (["train.desirable_weight=1.33"], "desirable_weight=1.33 has no meaning for loss 'sigmoid'"),
    (["train.loss=ipo", "train.undesirable_weight=0.8"], "undesirable_weight=0.8 has no meaning for loss 'ipo'"),
    (["train.loss=kto", "train.label_smoothing=0.1"], "label_smoothing=0.1 has no meaning for loss 'kto'"),
    (["train.loss=[kto, sft]"], "cannot be mixed with other objectives"),
    (["train.loss=kto", "train.sft_weight=0.5"], "cannot be mixed with other objectives"),
    (["train.loss=kto", "train.use_weighting=true"], "loss 'kto' has unpaired rows"),
    (["train.loss=kto", "train.desirable_weight=0"], "greater than 0"),
    (["train.loss=[ipo, hinge]", "train.label_smoothing=0.1"],
     "label_smoothing=0.1 has no meaning for loss \\['ipo', 'hinge'\\]"),
])
def test_a_setting_the_loss_does_not_read_fails_at_load(overrides, message):
    with pytest.raises(ValidationError, match=message):
        load_config("configs/default.yaml", overrides)


@pytest.mark.parametrize("overrides", [
    ["train.loss=robust", "train.label_smoothing=0.1"],
    ["train.loss=simpo", "train.simpo_gamma=1.0", "train.label_smoothing=0.1"],
    ["train.loss=ipo", "train.simpo_gamma=0.5"],  # the default value is no setting
    ["train.loss=exo_pair", "train.label_smoothing=0.001", "train.f_divergence=js"],
    ["train.loss=sigmoid", "train.f_divergence=alpha", "train.f_alpha=0.3"],
    ["train.loss=discopop", "train.discopop_tau=0.1"],
    ["train.loss=bco_pair", "train.bco_running_delta=true"],
    ["train.loss=ipo", "train.use_weighting=true", "train.ld_alpha=0.5"],
    ["train.loss=kto", "train.desirable_weight=1.33", "train.undesirable_weight=0.9"],
])
def test_settings_the_loss_reads_load(overrides):
    cfg = load_config("configs/default.yaml", overrides)
    assert cfg.train.loss == overrides[0].split("=")[1]


def test_a_mixture_loads_with_one_weight_per_loss():
    cfg = load_config("configs/default.yaml", ["train.loss=[sigmoid, bco_pair, sft]",
                                               "train.loss_weights=[0.8, 0.2, 1.0]", "train.label_smoothing=0.1"])
    assert cfg.train.objective() == [("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)]
    assert cfg.train.objective_name() == "0.8*sigmoid+0.2*bco_pair+1*sft"
    assert cfg.train.needs_reference()
    # RPO's sft_weight is the same `sft` component; weights default to 1
    rpo = TrainConfig(loss=["simpo"], sft_weight=0.5)
    assert rpo.objective() == [("simpo", 1.0), ("sft", 0.5)] and not rpo.needs_reference()


def test_changing_the_loss_later_is_checked_too():
    cfg = TrainConfig(loss="sigmoid", label_smoothing=0.1)
    with pytest.raises(ValidationError, match="no meaning for loss 'ipo'"):
        cfg.loss = "ipo"


def test_unknown_loss_names_the_known_ones():
    with pytest.raises(ValidationError, match="'sigmoid', 'ipo'"):
        TrainConfig(loss="dpo")


def test_loss_settings_name_train_fields_and_known_losses():
    for name, users in LOSS_SETTINGS.items():
        assert name in TrainConfig.model_fields
        assert users and set(users) <= set(LOSS_TYPES)


@pytest.mark.parametrize("overrides, message", [
    (["data.validation_fraction=0", "train.eval_every=4", "train.select=last"],
     "train.eval_every=4 scores the validation split: set data.validation_fraction"),
    (["train.eval_every=null"], "train.select=best_val needs train.eval_every"),
    (["train.select_metric=loss"], "'val/rewards/accuracies'"),
    (["train.eval_every=null", "train.select=last", "train.patience=2"], "train.patience=2 counts validation scorings"),
])
def test_validation_settings_are_checked_at_load(overrides, message):
    with pytest.raises(ValidationError, match=message):
        load_config("configs/default.yaml", overrides)
    ok = load_config("configs/default.yaml", ["data.validation_fraction=0.1", "train.eval_every=4",
                                              "train.select=best_val", "train.select_metric=val/loss"])
    assert (ok.train.select, ok.train.select_metric) == ("best_val", "val/loss")


def test_without_lora_is_the_model_section_minus_its_adapters():
    cfg = load_config("configs/default.yaml", ["model.lora.r=4"])
    base = cfg.model.without_lora()
    assert base.lora is None and cfg.model.lora is not None and cfg.model.lora.r == 4
    assert base.model_dump(exclude={"lora"}) == cfg.model.model_dump(exclude={"lora"})
