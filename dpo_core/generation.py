"""Batched chat generation for the evaluation stage: left-padded, greedy or sampled, seeded, stops at end-of-turn.

`generate(model, tokenizer, prompts, max_new_tokens=...)` renders every prompt (a chat message list) through the
tokenizer's chat template with the generation prompt (`encode_prompts`: `dpo_core.templating`, the same renderer the
training data goes through), then decodes the ids (`generate_from_ids`, which a caller decoding the same prompts with
several models calls directly): it left-pads each batch (with `dpo_core.models.pad_id` of the tokenizer) so all
prompts end at the same position, and decodes with Hugging Face `model.generate` under a fully explicit
`GenerationConfig` (no sampling knob is inherited from the model's own `generation_config.json`, so the reference and
the policy decode under exactly the same settings). Each `Generation` carries the prompt ids it was generated from,
so a caller that scores the answer uses exactly those ids and does not render the prompt again.

Stopping: a sequence stops at the first *stop token*: the tokenizer's eos, the model's configured eos ids, and the
special token(s) the chat template writes right after an assistant turn (`<|im_end|>` for SmolLM2 and Qwen,
`<|eot_id|>` for Llama 3), found by rendering a probe conversation, so any chat model works without a table of names.

Determinism: sampling draws from torch's global generator, seeded with `seed` inside `torch.random.fork_rng` (the
caller's RNG state is left untouched). The same model, prompts, seed and `batch_size` give the same tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dpo_core.models import DeviceSpec, model_spec, pad_id
from dpo_core.templating import ChatRenderer, PairRenderError

__all__ = ["Generation", "GenerationError", "PromptRenderError", "encode_prompts", "generate", "generate_from_ids",
           "stop_token_ids"]

_PROBE_ANSWER = "Probe answer for end-of-turn detection."


class GenerationError(ValueError):
    """Generation cannot run with these inputs; the message says what to fix."""


class PromptRenderError(GenerationError):
    """A prompt cannot be rendered through the chat template: ``index`` is its position in the prompts given,
    ``reason`` what is wrong with it."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"prompt {index} cannot be rendered: {reason}")
        self.index = index
        self.reason = reason


@dataclass(frozen=True)
class Generation:
    """One generated answer.

    Attributes:
        text: the answer decoded without special tokens (the end-of-turn marker is not in it).
        n_tokens: number of tokens the model generated, the stop token included when it emitted one.
        stopped_at_eos: True when the model emitted a stop token within `max_new_tokens`; False when it was cut.
        token_ids: the generated ids (`n_tokens` of them; the stop token last when `stopped_at_eos`), no padding.
        prompt_ids: the rendered prompt the model generated from (after any left cut), no padding.
    """

    text: str
    n_tokens: int
    stopped_at_eos: bool
    token_ids: list[int]
    prompt_ids: list[int]

    @property
    def prompt_tokens(self) -> int:
        """Length of the rendered prompt the model saw."""
        return len(self.prompt_ids)

    @property
    def content_ids(self) -> list[int]:
        """The answer's ids without the trailing stop token (for repetition statistics)."""
        return self.token_ids[:-1] if self.stopped_at_eos else list(self.token_ids)


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """The ids that end an answer: tokenizer eos, the model's configured eos, and the template's end-of-turn token(s).

    The end-of-turn tokens are the special tokens the chat template renders directly after an assistant message's
    content (e.g. `<|im_end|>`), found by rendering a probe conversation.
    """
    ids = set(_as_id_list(getattr(tokenizer, "eos_token_id", None)))
    gen_cfg = getattr(model, "generation_config", None)
    ids.update(_as_id_list(getattr(gen_cfg, "eos_token_id", None)))
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": _PROBE_ANSWER}], tokenize=False
        )
        if isinstance(text, str) and _PROBE_ANSWER in text:
            suffix = text.split(_PROBE_ANSWER, 1)[1]
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
            for tid in suffix_ids:  # the first special token after the content closes the turn
                if tid in special:
                    ids.add(int(tid))
                    break
    if not ids:
        raise GenerationError(
            "cannot tell where an answer ends: the tokenizer has no eos token and its chat template writes no special "
            "end-of-turn token; set an eos token on the tokenizer"
        )
    return sorted(ids)


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
        attention[i, width - len(s) :] = 1
    return input_ids.to(device), attention.to(device)


def _cut_at_stop(row: Sequence[int], stops: set[int]) -> tuple[list[int], bool]:
    for i, tid in enumerate(row):
        if tid in stops:
            return list(row[: i + 1]), True
    return list(row), False


@contextlib.contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block (unchanged when None), restored after."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_args(max_new_tokens: int, temperature: float, top_p: float, batch_size: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature > 0:
        raise GenerationError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GenerationError(f"batch_size must be a positive int, got {batch_size!r}")


def encode_prompts(tokenizer: Any, prompts: list[list[dict]], *, system_prompt: str | None = None,
                   max_prompt_length: int | None = None) -> list[list[int]]:
    """The ids each chat prompt is generated from: rendered with the generation prompt (``system_prompt``: the
    system-prompt policy of `dpo_core.templating`) and, when ``max_prompt_length`` is set, cut from the LEFT to that
    many tokens like the training data (the generation header at the end is kept).

    Raises:
        PromptRenderError: a prompt the chat template cannot render (it names the prompt's position).
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise GenerationError(f"prompts must be a list of chat message lists, got {type(prompts).__name__}")
    renderer = ChatRenderer(tokenizer, system_prompt)
    texts = []
    for i, messages in enumerate(prompts):
        try:
            texts.append(renderer.prompt_text(messages))
        except PairRenderError as exc:
            raise PromptRenderError(i, str(exc)) from exc
    prompt_ids = renderer.encode(texts)
    if max_prompt_length is not None:
        prompt_ids = [ids[-max_prompt_length:] for ids in prompt_ids]
    return prompt_ids


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[dict]],
    *,
    system_prompt: str | None = None,
    max_prompt_length: int | None = None,
    **decoding: Any,
) -> list[Generation]:
    """Generate one answer per chat prompt, in the prompts' order: `encode_prompts`, then `generate_from_ids`.

    Args:
        model: any Hugging Face causal LM (or a peft wrapper of one) with `.generate`.
        tokenizer: its tokenizer, with a chat template and a pad or eos token (`dpo_core.models.pad_id`).
        prompts: chat message lists `[{"role", "content"}, ...]` ending with a user turn.
        system_prompt: the system-prompt policy of `dpo_core.templating` (None / "" / a text).
        max_prompt_length: when set, a longer rendered prompt is cut from the LEFT to this many tokens, like the
            training data (the generation header at the end is kept).
        decoding: the decoding settings of `generate_from_ids` (`max_new_tokens` is required).

    Returns:
        One `Generation` per prompt, holding the prompt ids it was generated from.

    Raises:
        PromptRenderError: a prompt the chat template cannot render (it names the prompt's position).
    """
    prompt_ids = encode_prompts(tokenizer, prompts, system_prompt=system_prompt, max_prompt_length=max_prompt_length)
    return generate_from_ids(model, tokenizer, prompt_ids, **decoding)


def generate_from_ids(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 4,
    spec: DeviceSpec | None = None,
    num_threads: int | None = None,
) -> list[Generation]:
    """One answer per prompt of `prompt_ids` (`encode_prompts` output), in their order.

    Args:
        max_new_tokens: the most tokens generated per answer (the stop token included).
        do_sample: False = greedy; True = sample with `temperature` and nucleus `top_p` (no top-k).
        seed: seeds the sampler (ignored by greedy decoding, which is deterministic anyway).
        batch_size: prompts per `generate` call; each batch is left-padded to its longest prompt.
        spec: device and autocast; defaults to the model's own device without autocast.
        num_threads: torch threads while decoding on CPU (the process's setting is restored after); None keeps the
            process's setting. Decoding a small batch token by token gains little from more threads and, on a machine
            whose cores are busy (another stage beside it), loses several times over to them waiting on each other.
    """
    _check_args(max_new_tokens, temperature, top_p, batch_size)
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                    or num_threads < 1):
        raise GenerationError(f"num_threads must be a positive int or None, got {num_threads!r}")
    if not prompt_ids:
        return []
    from transformers import GenerationConfig

    pad = pad_id(tokenizer)
    stops = stop_token_ids(tokenizer, model)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=bool(do_sample),
        repetition_penalty=1.0,
        num_beams=1,
        eos_token_id=stops,
        pad_token_id=pad,
        # sampling knobs only when sampling (greedy decoding warns about them otherwise); top_k=0 disables top-k
        **({"temperature": float(temperature), "top_p": float(top_p), "top_k": 0} if do_sample else {}),
    )
    spec = spec if spec is not None else model_spec(model)
    device = spec.device
    was_training = model.training
    model.eval()
    out: list[Generation] = []
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), spec.autocast(), \
                _cpu_threads(num_threads if device.type == "cpu" else None):
            torch.manual_seed(seed)
            for start in range(0, len(prompt_ids), batch_size):
                chunk = prompt_ids[start : start + batch_size]
                input_ids, attention = _left_pad(chunk, pad, device)
                result = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
                new_tokens = result[:, input_ids.shape[1] :].tolist()
                for ids, row in zip(chunk, new_tokens):
                    token_ids, stopped = _cut_at_stop(row, set(stops))
                    text = tokenizer.decode(token_ids, skip_special_tokens=True)
                    out.append(Generation(text, len(token_ids), stopped, token_ids, list(ids)))
    finally:
        model.train(was_training)
    return out
