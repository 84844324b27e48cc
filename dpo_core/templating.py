"""Chat templating: canonical preference pairs -> prompt / response token ids, through the tokenizer's own template.

Conventions:

* **Prompt ids** are the rendered prompt *with* the generation prompt (e.g. ``<|im_start|>assistant\\n``).
* **Response ids** are the assistant turn exactly as the template renders it: the ids of the rendered full
  conversation (prompt + assistant message, no generation prompt) minus the prompt prefix. The end-of-turn marker
  and anything the template writes after it (SmolLM2 and Qwen write ``<|im_end|>\\n``) are included.
* The **prefix property** is checked for every pair, twice: the rendered full conversation must start with the
  rendered prompt (text), and tokenizing the full text must reproduce the prompt ids as its prefix (tokens). When
  only the token check fails (a BPE merge across the boundary, e.g. a response starting with ``"\\n\\n"`` after the
  header's ``"\\n"``), the response is tokenized from the response *text* (the full text minus the prompt text) and
  appended to the prompt ids; the report counts these pairs (``prefix_fallback``). Tokens are never counted from
  the end of a sequence (the align-anything issue 215 bug). When the text check fails the template renders the
  prompt differently inside the full conversation and the pair is rejected with that reason.
* **System prompt** (``system_prompt`` argument, ``model.system_prompt`` in the config):

  - ``None`` keeps the pair's own system message if it has one, else whatever the template does by default
    (SmolLM2 and Qwen2.5 inject their default system prompt).
  - a non-empty string replaces the pair's system message (if any) with that text.
  - ``""`` means *no system prompt*: the pair's system message is dropped and the template's default is suppressed.
    For a template that renders no system block by default the prompt is rendered with no system message at all;
    for a template that injects a default when the first message is not a system message (SmolLM2, Qwen2.5) the
    only way to suppress it is an explicit system message with empty content, so an **empty system block** is
    rendered (``<|im_start|>system\\n<|im_end|>\\n``). Which case applies is detected from the template itself.
* **Truncation**: the prompt is cut from the LEFT to ``max_prompt_length`` tokens (its beginning is dropped; the
  generation-prompt header at its end is always kept), then each response is cut from the RIGHT to
  ``max_length - len(prompt)`` tokens (a cut response loses its end-of-turn marker). Flags are recorded per pair.
  A pair whose (cut) prompt leaves no room for a single response token is reported in
  ``TemplateReport.rejected`` (reason ``no_room``), never silently dropped; so is a pair that cannot be rendered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

__all__ = [
    "PairRenderError",
    "TemplateError",
    "TemplateReport",
    "ChatRenderer",
    "render_pair",
    "render_prompt_ids",
    "score_response_ids",
    "tokenize_pairs",
    "TOKENIZED_COLUMNS",
]

# the columns of data_contracts.tokenized.TokenizedPairs, in order (tests/test_contracts.py holds them equal)
TOKENIZED_COLUMNS = [
    "pair_id",
    "split",
    "prompt_ids",
    "chosen_ids",
    "rejected_ids",
    "prompt_truncated",
    "chosen_truncated",
    "rejected_truncated",
]
_REQUIRED_COLUMNS = ("pair_id", "prompt", "chosen", "rejected")
_ROLES = ("system", "user", "assistant")
_PROBE_USER = "Probe message for template inspection."
_PROBE_SYSTEM = "Probe system text for template inspection."


class TemplateError(ValueError):
    """The tokenizer, its chat template or the truncation settings cannot be used (affects every pair)."""


class PairRenderError(ValueError):
    """One pair cannot be rendered (bad messages, a template error, a broken prefix); the message says why."""


@dataclass
class TemplateReport:
    """Counts for the pipeline's report. ``pairs`` = input rows = ``tokenized`` + ``len(rejected)``.

    ``no_room`` pairs are also listed in ``rejected`` (reason starting with ``no_room``).
    ``prefix_fallback`` counts pairs whose response ids were tokenized from the response text because the
    tokenizer merged tokens across the prompt/response boundary.
    """

    pairs: int = 0
    prompt_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    no_room: int = 0
    rejected: list[dict] = field(default_factory=list)
    tokenized: int = 0
    prefix_fallback: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _normalise_messages(prompt: Any) -> list[dict[str, str]]:
    """Turn a canonical prompt (list of {role, content}; possibly a numpy array from Parquet) into plain dicts."""
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) and not hasattr(prompt, "tolist"):
        raise PairRenderError(f"prompt must be a list of {{role, content}} messages, got {type(prompt).__name__}")
    items = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
    if not items:
        raise PairRenderError("prompt has no messages")
    messages = []
    for i, m in enumerate(items):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise PairRenderError(f"prompt message {i} is not a {{role, content}} mapping")
        role, content = m["role"], m["content"]
        if role not in _ROLES:
            raise PairRenderError(f"prompt message {i} has role {role!r}; expected one of {list(_ROLES)}")
        if not isinstance(content, str):
            raise PairRenderError(f"prompt message {i} content is {type(content).__name__}, not a string")
        if role == "system" and i != 0:
            raise PairRenderError(f"prompt message {i} is a system message; only the first message may be one")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise PairRenderError(f"prompt must end with a user message, ends with {messages[-1]['role']!r}")
    return messages


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatRenderer:
    """Renders conversations through one tokenizer's chat template with one system-prompt policy.

    Built once per tokenizer (it inspects the template: whether it injects a default system prompt, how many
    tokens the generation-prompt header has) and reused for every pair.
    """

    def __init__(self, tokenizer: Any, system_prompt: str | None = None) -> None:
        if not callable(getattr(tokenizer, "apply_chat_template", None)):
            raise TemplateError(f"{type(tokenizer).__name__} is not a Hugging Face tokenizer with apply_chat_template")
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                f"the tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no chat "
                "template; set model.chat_template in the config"
            )
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TemplateError(f"system_prompt must be a string or None, got {type(system_prompt).__name__}")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        try:
            self.injects_default_system = self._detect_default_system()
            self.header_ids = self._detect_generation_header()
        except PairRenderError as exc:
            raise TemplateError(f"the chat template cannot render a simple conversation: {exc}") from exc

    # -- template inspection -------------------------------------------------------------------------------
    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja2 errors, raise_exception() in templates, ...
            raise PairRenderError(f"the chat template failed: {_first_line(exc)}") from exc
        if not isinstance(text, str):
            raise PairRenderError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not text")
        return text

    def _detect_default_system(self) -> bool:
        """True when rendering without a system message inserts system text of the template's own."""
        plain = self._render([{"role": "user", "content": _PROBE_USER}], False)
        marked = self._render(
            [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": _PROBE_USER}], False
        )
        if marked.count(_PROBE_SYSTEM) != 1:
            return False  # the template ignores system messages: nothing to suppress
        pre, post = marked.split(_PROBE_SYSTEM)
        return len(plain) > len(pre) + len(post) and plain.startswith(pre) and plain.endswith(post)

    def _detect_generation_header(self) -> list[int]:
        msgs = [{"role": "user", "content": _PROBE_USER}]
        with_gen = self.encode([self._render(msgs, True)])[0]
        without = self.encode([self._render(msgs, False)])[0]
        header = with_gen[_common_prefix_len(with_gen, without) :]
        if not header:
            raise TemplateError("the chat template adds nothing for add_generation_prompt=True; cannot find the "
                                "assistant header that starts a response")
        return header

    # -- rendering -----------------------------------------------------------------------------------------
    def encode(self, texts: list[str]) -> list[list[int]]:
        """Tokenize rendered texts in one batched call; the template already wrote any special tokens."""
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def messages(self, prompt: Any) -> list[dict[str, str]]:
        """The prompt messages with the system-prompt policy applied (see the module docstring)."""
        messages = _normalise_messages(prompt)
        if self.system_prompt is None:
            return messages
        body = messages[1:] if messages[0]["role"] == "system" else messages
        if not body:
            raise PairRenderError("prompt has only a system message")
        if self.system_prompt:
            return [{"role": "system", "content": self.system_prompt}, *body]
        if self.injects_default_system:
            return [{"role": "system", "content": ""}, *body]
        return body

    def prompt_text(self, prompt: Any) -> str:
        return self._render(self.messages(prompt), True)

    def texts(
        self, prompt: Any, responses: Sequence[Any], names: Sequence[str] = ("chosen", "rejected")
    ) -> tuple[str, list[str]]:
        """(prompt text with generation prompt, [response suffix text per response]); checks the text prefix."""
        messages = self.messages(prompt)
        prompt_text = self._render(messages, True)
        suffixes = []
        for name, response in zip(names, responses, strict=True):
            if not isinstance(response, str):
                if response is None or response != response:  # None, or NaN from a pandas column
                    raise PairRenderError(f"{name} is missing (null)")
                raise PairRenderError(f"{name} is {type(response).__name__}, not a string")
            full = self._render([*messages, {"role": "assistant", "content": response}], False)
            if not full.startswith(prompt_text):
                raise PairRenderError(
                    f"prefix property broken in text: the template renders the prompt differently once the "
                    f"{name} assistant turn is appended"
                )
            suffixes.append(full[len(prompt_text) :])
        return prompt_text, suffixes


def _split_response_ids(
    renderer: ChatRenderer,
    prompt_ids: list[list[int]],
    full_ids: list[list[int]],
    suffix_texts: list[str],
) -> tuple[list[list[int]], list[bool]]:
    """Response ids = full ids minus the prompt prefix; where the prefix is broken, tokenize the suffix text."""
    out: list[list[int] | None] = []
    fallback_at = []
    for i, (p, f) in enumerate(zip(prompt_ids, full_ids)):
        if len(f) > len(p) and f[: len(p)] == p:
            out.append(f[len(p) :])
        else:
            out.append(None)
            fallback_at.append(i)
    for i, ids in zip(fallback_at, renderer.encode([suffix_texts[i] for i in fallback_at])):
        out[i] = ids
    used = [False] * len(out)
    for i in fallback_at:
        used[i] = True
    return [o if o is not None else [] for o in out], used


def render_pair(pair: Mapping, tokenizer: Any, system_prompt: str | None) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_response_ids, rejected_response_ids) of one canonical pair, untruncated.

    Raises ``PairRenderError`` naming what is wrong with the pair, ``TemplateError`` for an unusable tokenizer.
    """
    renderer = ChatRenderer(tokenizer, system_prompt)
    missing = [c for c in _REQUIRED_COLUMNS[1:] if c not in pair]
    if missing:
        raise PairRenderError(f"pair is missing field(s) {missing}")
    result = _render_rows(renderer, [pair])[0]
    if isinstance(result, str):
        raise PairRenderError(result)
    prompt_ids, (chosen_ids, rejected_ids), _ = result
    return prompt_ids, chosen_ids, rejected_ids


def render_prompt_ids(messages: Any, tokenizer: Any, system_prompt: str | None) -> list[int]:
    """The prompt ids a model should generate from: the rendered messages plus the generation prompt."""
    renderer = ChatRenderer(tokenizer, system_prompt)
    return renderer.encode([renderer.prompt_text(messages)])[0]


def score_response_ids(
    prompt_messages: Any, response_text: str, tokenizer: Any, system_prompt: str | None
) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) for scoring a (generated) response text exactly like a training response."""
    renderer = ChatRenderer(tokenizer, system_prompt)
    prompt_text, (suffix,) = renderer.texts(prompt_messages, [response_text], names=("response",))
    prompt_ids, full_ids = renderer.encode([prompt_text, prompt_text + suffix])
    (response_ids,), _ = _split_response_ids(renderer, [prompt_ids], [full_ids], [suffix])
    return prompt_ids, response_ids


def _render_rows(
    renderer: ChatRenderer, rows: Sequence[Mapping]
) -> list[tuple[list[int], list[list[int]], int] | str]:
    """Per row: (prompt_ids, [chosen_ids, rejected_ids], n_fallbacks) or the reason it could not be rendered.

    Rendering is per row (the template is Jinja); tokenization is batched over all rows.
    """
    texts: list[tuple[str, list[str]] | str] = []
    for row in rows:
        try:
            texts.append(renderer.texts(row["prompt"], [row["chosen"], row["rejected"]]))
        except PairRenderError as exc:
            texts.append(str(exc))
    ok = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    prompt_texts = [texts[i][0] for i in ok]  # type: ignore[index]
    suffixes = [texts[i][1] for i in ok]  # type: ignore[index]
    prompt_ids = renderer.encode(prompt_texts)
    responses: list[list[list[int]]] = [[], []]
    fallbacks = [0] * len(ok)
    for k in range(2):
        full_ids = renderer.encode([p + s[k] for p, s in zip(prompt_texts, suffixes)])
        ids, used = _split_response_ids(renderer, prompt_ids, full_ids, [s[k] for s in suffixes])
        responses[k] = ids
        fallbacks = [f + int(u) for f, u in zip(fallbacks, used)]
    out: list[tuple[list[int], list[list[int]], int] | str] = list(texts)  # type: ignore[arg-type]
    for j, i in enumerate(ok):
        chosen, rejected = responses[0][j], responses[1][j]
        if not chosen or not rejected:
            out[i] = "the template renders an empty assistant turn"
        else:
            out[i] = (prompt_ids[j], [chosen, rejected], fallbacks[j])
    return out


def _check_lengths(renderer: ChatRenderer, max_length: int, max_prompt_length: int) -> None:
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TemplateError(f"{name} must be an int, got {type(value).__name__}")
    header = len(renderer.header_ids)
    if max_prompt_length < header + 1:
        raise TemplateError(
            f"max_prompt_length={max_prompt_length} is too small: the generation-prompt header alone takes "
            f"{header} tokens; need at least {header + 1}"
        )
    if max_length < header + 2:
        raise TemplateError(
            f"max_length={max_length} is too small: need room for the {header}-token generation-prompt header, "
            f"one prompt token and one response token (at least {header + 2})"
        )


def tokenize_pairs(
    pairs: pd.DataFrame,
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int,
    system_prompt: str | None = None,
) -> tuple[pd.DataFrame, TemplateReport]:
    """Tokenize canonical pairs through the tokenizer's chat template, truncate, and report.

    Args:
        pairs: canonical pairs with columns ``pair_id``, ``prompt`` (list of ``{role, content}``, optional system
            first, last is user), ``chosen``, ``rejected``; ``split`` is copied through when present.
        tokenizer: a Hugging Face tokenizer with a chat template.
        max_length: maximum tokens of prompt + response.
        max_prompt_length: the prompt is cut from the left to this many tokens (the generation header is kept).
            May exceed ``max_length - 1``; pairs whose prompt then leaves no room are reported as ``no_room``.
        system_prompt: ``None`` (template default / the pair's own), ``""`` (none), or a text (see module doc).

    Returns:
        (DataFrame with ``TOKENIZED_COLUMNS`` — ``chosen_ids``/``rejected_ids`` hold response ids only — and a
        ``TemplateReport``). Rows that could not be tokenized are absent from the frame and listed in the report.
    """
    if not isinstance(pairs, pd.DataFrame):
        raise TemplateError(f"pairs must be a pandas DataFrame, got {type(pairs).__name__}")
    missing = [c for c in _REQUIRED_COLUMNS if c not in pairs.columns]
    if missing:
        raise TemplateError(f"pairs is missing column(s) {missing}; have {list(pairs.columns)}")
    renderer = ChatRenderer(tokenizer, system_prompt)
    _check_lengths(renderer, max_length, max_prompt_length)

    records = pairs.to_dict("records")
    report = TemplateReport(pairs=len(records))
    rendered = _render_rows(renderer, records)
    has_split = "split" in pairs.columns
    out_rows = []
    for row, result in zip(records, rendered):
        pair_id = row["pair_id"]
        if isinstance(result, str):
            report.rejected.append({"pair_id": pair_id, "reason": result})
            continue
        prompt, (chosen, rejected), n_fallback = result
        prompt_truncated = len(prompt) > max_prompt_length
        if prompt_truncated:
            prompt = prompt[len(prompt) - max_prompt_length :]
        room = max_length - len(prompt)
        if room < 1:
            report.no_room += 1
            report.rejected.append(
                {
                    "pair_id": pair_id,
                    "reason": f"no_room: the prompt takes {len(prompt)} tokens (max_prompt_length="
                    f"{max_prompt_length}), leaving none of max_length={max_length} for a response",
                }
            )
            continue
        chosen_truncated, rejected_truncated = len(chosen) > room, len(rejected) > room
        report.prompt_truncated += prompt_truncated
        report.chosen_truncated += chosen_truncated
        report.rejected_truncated += rejected_truncated
        report.prefix_fallback += n_fallback > 0
        out_rows.append(
            {
                "pair_id": pair_id,
                "split": row["split"] if has_split else None,
                "prompt_ids": prompt,
                "chosen_ids": chosen[:room],
                "rejected_ids": rejected[:room],
                "prompt_truncated": prompt_truncated,
                "chosen_truncated": chosen_truncated,
                "rejected_truncated": rejected_truncated,
            }
        )
    report.tokenized = len(out_rows)
    columns = TOKENIZED_COLUMNS if has_split else [c for c in TOKENIZED_COLUMNS if c != "split"]
    frame = pd.DataFrame(out_rows, columns=TOKENIZED_COLUMNS)[columns]
    return frame.reset_index(drop=True), report
