"""The run configuration: loss names and the settings each loss reads are checked when a config loads."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dpo_core.config import LOSS_SETTINGS, LOSS_TYPES, TrainConfig, load_config


@pytest.mark.parametrize("overrides, message", [
    (["train.loss=ipo", "train.label_smoothing=0.1"], "label_smoothing=0.1 has no meaning for loss 'ipo'"),
    (["train.loss=hinge", "train.label_smoothing=0.2"], "label_smoothing=0.2 has no meaning for loss 'hinge'"),
    (["train.simpo_gamma=1.0"], "simpo_gamma=1.0 has no meaning for loss 'sigmoid'"),
])
def test_a_setting_the_loss_does_not_read_fails_at_load(overrides, message):
    with pytest.raises(ValidationError, match=message):
        load_config("configs/default.yaml", overrides)


@pytest.mark.parametrize("overrides", [
    ["train.loss=robust", "train.label_smoothing=0.1"],
    ["train.loss=simpo", "train.simpo_gamma=1.0", "train.label_smoothing=0.1"],
    ["train.loss=ipo", "train.simpo_gamma=0.5"],  # the default value is no setting
])
def test_settings_the_loss_reads_load(overrides):
    cfg = load_config("configs/default.yaml", overrides)
    assert cfg.train.loss == overrides[0].split("=")[1]


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
    (["train.eval_every=4"], "train.eval_every=4 scores the validation split: set data.validation_fraction"),
    (["data.validation_fraction=0.1", "train.select=best_val"], "train.select=best_val needs train.eval_every"),
    (["data.validation_fraction=0.1", "train.eval_every=4", "train.select_metric=loss"], "'val/rewards/accuracies'"),
    (["data.validation_fraction=0.1", "train.patience=2"], "train.patience=2 counts validation scorings"),
])
def test_validation_settings_are_checked_at_load(overrides, message):
    with pytest.raises(ValidationError, match=message):
        load_config("configs/default.yaml", overrides)
    ok = load_config("configs/default.yaml", ["data.validation_fraction=0.1", "train.eval_every=4",
                                              "train.select=best_val", "train.select_metric=val/loss"])
    assert (ok.train.select, ok.train.select_metric) == ("best_val", "val/loss")
