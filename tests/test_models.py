"""Model and tokenizer loading: the embedded SmolLM2, local folders, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from dpo_core.config import LoraConfig, ModelConfig
from dpo_core.models import (
    ModelLoadError,
    attach_lora,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_model_path,
)


def test_embedded_model_is_materialised_once_and_loads(smollm2_dir, monkeypatch):
    monkeypatch.setenv("DPO_MODEL_CACHE", str(smollm2_dir.parent))
    assert resolve_model_path(ModelConfig(), smollm2_dir.parent) == smollm2_dir  # cached: no second conversion
    model = load_model(smollm2_dir, ModelConfig())
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert next(model.parameters()).dtype == torch.float32


def test_cpu_device_is_float32_and_autocasts_only_to_bfloat16_when_asked(caplog):
    spec = pick_device(ModelConfig(device="cpu"))
    assert spec.device.type == "cpu" and spec.dtype == torch.float32 and spec.autocast_dtype is None
    bf16 = pick_device(ModelConfig(device="cpu", dtype="bfloat16"))
    assert bf16.dtype == torch.float32 and bf16.autocast_dtype is torch.bfloat16  # float32 master weights
    with bf16.autocast():
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.bfloat16
    with caplog.at_level("WARNING"):
        fp16 = pick_device(ModelConfig(device="cpu", dtype="float16"))
    assert fp16.autocast_dtype is None and "float16 requested on CPU" in caplog.text


def test_cuda_requested_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        pick_device(ModelConfig(device="cuda"))


@pytest.mark.parametrize("name, message", [
    ("./no/such/folder", r"model folder /\S+/no/such/folder does not exist .*or a hub id"),
    ("not-a-model", r"model folder /\S+/not-a-model does not exist"),
    ("models/Qwen2.5-0.5B-Instruct", r"model folder /\S+/models/Qwen2.5-0.5B-Instruct does not exist .*hub is offline"),
])
def test_unknown_model_names_are_clear_errors(name, message, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=message) as err:
        resolve_model_path(ModelConfig(name_or_path=name))
    assert "\n" not in str(err.value) and "looks like" not in str(err.value)


def test_a_hub_id_passes_through_when_online(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_model_path(ModelConfig(name_or_path="some-org/some-model")) == "some-org/some-model"


def test_folder_without_config_or_tokenizer_is_a_clear_error(tmp_path, tiny_model_dir):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path)))
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    (weights_only / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no usable tokenizer"):
        load_tokenizer(weights_only, ModelConfig())


def test_tokenizer_without_chat_template_needs_one_configured(tmp_path, tiny_model_dir):
    folder = tmp_path / "no-template"
    folder.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name != "chat_template.jinja":
            (folder / f.name).write_bytes(f.read_bytes())
    cfg_file = folder / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text())
    tok_cfg.pop("chat_template", None)
    cfg_file.write_text(json.dumps(tok_cfg))
    with pytest.raises(ModelLoadError, match="no chat template"):
        load_tokenizer(folder, ModelConfig())
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    tok = load_tokenizer(folder, ModelConfig(chat_template=template))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi</s>"


def test_lora_wraps_the_model_and_trains_only_adapters(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(r=4, alpha=8))
    model = load_model(tiny_model_dir, cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ModelLoadError, match="model.lora section"):
        attach_lora(model, ModelConfig())  # no lora section configured
