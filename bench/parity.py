"""Parity with TRL: on the same batch, our log-probs, rewards and loss equal TRL `DPOTrainer`'s in float32.

`python -m bench.parity` (tiny random Llama with the real SmolLM2 tokenizer, seconds) or
`python -m bench.parity --model smollm2` (the embedded SmolLM2-135M; ~1 min). Exit status 1 on any mismatch.

What is compared, per pair of the batch (4 UltraFeedback pairs, the benchmark's selection):

* token ids: TRL's own tokenization (`DPOTrainer._prepare_dataset` + its collator, cut at `max_length`) against
  `dpo_core.templating.tokenize_pairs` + `dpo_core.batching.collate_pairs`;
* policy log-prob sums of chosen and rejected: TRL's fused-LM-head forward (the lines of
  `DPOTrainer._compute_loss`) against `dpo_core.logprobs.sequence_logps`, on two padded rows per pair (TRL's layout)
  and on the trainer's default shared-prompt rows (`dpo_core.batching.share_prompt_pairs`), with their rewards and
  loss;
* reference log-prob sums: TRL's `compute_ref_log_probs` (its precompute path) against both
  `dpo_core.reference.compute_reference_logps` (our precomputed table) and a live `sequence_logps`;
* rewards (beta * log-ratio) and the loss: TRL's `_compute_loss` itself (loss and its logged metric means)
  against `dpo_core.losses.preference_loss("sigmoid", ...)`;
* the gradient of every policy parameter of that loss: TRL's backward against ours through `sequence_logps`;
* with `--objectives`, every objective TRL's `DPOTrainer` has (`OBJECTIVE_CASES`: each `loss_type`, the
  f-divergences, a weighted mixture, WPO and LD-DPO): loss, mean rewards and the gradient with respect to each
  log-prob sum (`objective_parity`, which says why that and the parameter gradients above cover every parameter);
  ORPO and CPO against TRL's experimental trainers' loss functions (`reference_free_parity`); and KTO against
  TRL's `KTOTrainer` on the pairs split into unpaired rows (`kto_parity`: loss, rewards, KL, gradients).

Tolerance: |ours - TRL| <= ATOL + RTOL * |TRL| with ATOL = RTOL = 1e-4 (log-prob sums over ~100 tokens are in the
hundreds; float32 summation order alone moves them by ~1e-5 relative).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from bench.common import BenchSettings, load_bench_data, load_policy, load_tokenizer, model_dir

ATOL = 1e-4
RTOL = 1e-4


@dataclass
class ParityReport:
    rows: list[tuple[str, float, float, float]] = field(default_factory=list)  # (name, ours, trl, abs diff)
    failures: list[str] = field(default_factory=list)

    def check(self, name: str, ours, trl) -> None:
        ours_t = torch.as_tensor(ours, dtype=torch.float64).flatten()
        trl_t = torch.as_tensor(trl, dtype=torch.float64).flatten()
        if ours_t.shape != trl_t.shape:
            self.failures.append(f"{name}: shape {tuple(ours_t.shape)} vs TRL {tuple(trl_t.shape)}")
            return
        for i, (a, b) in enumerate(zip(ours_t.tolist(), trl_t.tolist())):
            diff = abs(a - b)
            label = f"{name}[{i}]" if ours_t.numel() > 1 else name
            self.rows.append((label, a, b, diff))
            if not diff <= ATOL + RTOL * abs(b):
                self.failures.append(f"{label}: ours {a:.6f} vs TRL {b:.6f} (diff {diff:.2e})")

    def check_max(self, name: str, ours, trl) -> None:
        """One row for a whole tensor: its largest |ours - TRL|, failing where any element is out of tolerance."""
        ours_t, trl_t = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(trl, dtype=torch.float64)
        if ours_t.shape != trl_t.shape:
            self.failures.append(f"{name}: shape {tuple(ours_t.shape)} vs TRL {tuple(trl_t.shape)}")
            return
        diff = (ours_t - trl_t).abs()
        worst = int(diff.argmax())
        self.rows.append((name, float(ours_t.flatten()[worst]), float(trl_t.flatten()[worst]), float(diff.max())))
        bad = int((diff > ATOL + RTOL * trl_t.abs()).sum())
        if bad:
            self.failures.append(f"{name}: {bad} of {diff.numel()} elements out of tolerance (max diff "
                                 f"{float(diff.max()):.2e})")

    @property
    def ok(self) -> bool:
        return not self.failures

    def max_abs_diff(self) -> float:
        return max((r[3] for r in self.rows), default=0.0)

    def render(self) -> str:
        lines = [f"{'quantity':<28}{'ours':>16}{'TRL':>16}{'|diff|':>12}"]
        lines += [f"{n:<28}{a:>16.6f}{b:>16.6f}{d:>12.2e}" for n, a, b, d in self.rows]
        lines.append(f"max |diff| = {self.max_abs_diff():.2e}; tolerance {ATOL:g} + {RTOL:g} * |TRL|")
        lines.append("PARITY OK" if self.ok else "PARITY FAILED:\n  " + "\n  ".join(self.failures))
        return "\n".join(lines)


def _models(kind: str, tokenizer, path):
    """(policy, reference): two different networks, so that rewards are not trivially zero."""
    if kind == "tiny":
        from dpo_core.models import tiny_llama

        return tiny_llama(tokenizer, seed=1), tiny_llama(tokenizer, seed=0)
    reference = load_policy(path)
    policy = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a deterministic small perturbation stands in for "a few steps of training"
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 2e-3)
    return policy, reference


@dataclass
class Setup:
    """One batch scored both ways: our rows, log-probs and reference table, and TRL's trainer and collated inputs."""

    beta: float
    policy: torch.nn.Module
    rows: list[dict]
    batch: object  # dpo_core.batching.PairBatch, two padded rows per pair (TRL's layout)
    ref_chosen: torch.Tensor  # our precomputed reference table, Float[B]
    ref_rejected: torch.Tensor
    ref_shared: tuple[torch.Tensor, torch.Tensor]  # its sums over the shared length (chosen, rejected), Float[B]
    ours: object  # dpo_core.logprobs.SequenceScores of the policy on `batch` (with shared and WPO sums), no grad
    trainer: object  # trl.DPOTrainer
    inputs: dict  # TRL's collated batch
    trl_out: object  # TRL's fused-LM-head output of the policy on `inputs` (per-token log-probs, ...), no grad
    trl_logps: torch.Tensor  # TRL's policy log-prob sums, Float[2B] (chosen then rejected), no grad
    trl_ref: tuple[torch.Tensor, torch.Tensor]  # TRL's reference log-prob sums (chosen, rejected), Float[B] each
    trl_shared: torch.Tensor  # TRL's policy sums over the shared length (its `ld_alpha` masks), Float[2B]
    trl_ref_shared: tuple[torch.Tensor, torch.Tensor]  # the same for the reference, Float[B] each
    trl_wpo: torch.Tensor  # TRL's per-sequence sums of log p - log sum p^2 (its WPO terms), Float[2B]


@contextmanager
def trl_setup(kind: str = "tiny", n_pairs: int = 4, beta: float = 0.1, **trl_args) -> Iterator[Setup]:
    """The benchmark's pairs, a policy and a reference, our reference table and policy scores, and a TRL
    ``DPOTrainer`` (live reference, CPU, float32, its LM head also returning WPO's log sum p^2) with its collated batch
    of the same pairs and its scores of them. ``trl_args`` go to ``DPOConfig``."""
    from trl import DPOConfig, DPOTrainer

    from bench.trl_dpo import conversational_dataset
    from dpo_core.batching import collate_pairs
    from dpo_core.logprobs import sequence_scores, split_pair_logps
    from dpo_core.models import DeviceSpec, pad_id
    from dpo_core.reference import compute_reference_logps

    torch.manual_seed(0)
    s = BenchSettings(timed_steps=1, batch_size=n_pairs, beta=beta)
    path = model_dir()
    tokenizer = load_tokenizer(path)
    data = load_bench_data(tokenizer, s, n_pairs)
    policy, reference = _models(kind, tokenizer, path)
    policy.float().eval()
    reference.float().eval()
    spec = DeviceSpec(device=torch.device("cpu"), dtype=torch.float32, autocast_dtype=None, attn_implementation="sdpa")
    ref_table = compute_reference_logps(reference, data.tokenized, batch_size=2, spec=spec)
    rows = data.tokenized.to_dict("records")
    with tempfile.TemporaryDirectory(prefix="bench-parity-") as out_dir:
        args = DPOConfig(
            output_dir=out_dir, per_device_train_batch_size=n_pairs, max_length=s.max_length, beta=beta,
            bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, report_to="none",
            save_strategy="no", disable_tqdm=True, precompute_ref_log_probs=False, use_weighting=True, **trl_args,
        )  # fmt: skip
        trainer = DPOTrainer(
            model=policy, ref_model=reference, args=args, train_dataset=conversational_dataset(data),
            processing_class=tokenizer,
        )  # fmt: skip
        examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
        inputs = trainer.data_collator(examples)
        trainer.model.eval()
        batch = collate_pairs(rows, pad_id(tokenizer))
        completion = inputs["completion_mask"][:, 1:]
        with torch.no_grad():  # TRL's fused-LM-head forward (the lines of `DPOTrainer._compute_loss`)
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            out = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                labels=labels, fused_lm_head=True, use_cache=False)
            trl_ref = trainer.compute_ref_log_probs(trainer.ref_model, inputs)
            trainer.ld_alpha = 0.0  # LD-DPO's weight 0 on the tail: TRL's sums over the shared length alone
            trl_shared = torch.cat(trainer.compute_ref_log_probs(trainer.model, inputs))
            trl_ref_shared = trainer.compute_ref_log_probs(trainer.ref_model, inputs)
            trainer.ld_alpha = None
            ours = sequence_scores(policy, batch, shared=True, wpo=True)

        def column(name: str) -> torch.Tensor:
            return torch.tensor(ref_table[name].to_numpy(), dtype=torch.float32)

        yield Setup(beta=beta, policy=policy, rows=rows, batch=batch, ref_chosen=column("chosen_logps"),
                    ref_rejected=column("rejected_logps"),
                    ref_shared=(column("chosen_shared_logps"), column("rejected_shared_logps")), ours=ours,
                    trainer=trainer, inputs=inputs, trl_out=out, trl_logps=out.log_probs.sum(dim=1), trl_ref=trl_ref,
                    trl_shared=trl_shared, trl_ref_shared=trl_ref_shared,
                    trl_wpo=((out.log_probs - out.log_sum_sq_probs) * completion).sum(dim=1))


def run(kind: str = "tiny", n_pairs: int = 4, beta: float = 0.1, setup: Setup | None = None) -> ParityReport:
    """The log-probs, reference, rewards and sigmoid loss of both (see the module docstring); on ``setup`` when
    given (its ``beta``), else on a new one."""
    if setup is None:
        with trl_setup(kind, n_pairs, beta) as setup:
            return run(setup=setup)
    return _compare_scoring(setup)


def _compare_scoring(setup: Setup) -> ParityReport:
    from dpo_core.batching import share_prompt_pairs
    from dpo_core.logprobs import sequence_logps, split_pair_logps
    from dpo_core.losses import preference_loss
    from dpo_core.models import pad_id

    report, beta, trainer, inputs, batch = ParityReport(), setup.beta, setup.trainer, setup.inputs, setup.batch
    ref_c, ref_r = setup.ref_chosen, setup.ref_rejected
    # --- ours: policy log-probs (TRL's two padded rows per pair, and the trainer's default shared-prompt rows), a
    # live reference, the loss on our precomputed reference table
    with torch.no_grad():
        pol_c, pol_r = split_pair_logps(sequence_logps(setup.policy, batch)[0])
        live_c, live_r = split_pair_logps(sequence_logps(trainer.ref_model, batch)[0])
        shared = share_prompt_pairs(setup.rows, pad_id(trainer.processing_class))
        shared_c, shared_r = split_pair_logps(sequence_logps(setup.policy, shared)[0])
    ours = preference_loss("sigmoid", pol_c, pol_r, ref_c, ref_r, beta=beta)
    ours_shared = preference_loss("sigmoid", shared_c, shared_r, ref_c, ref_r, beta=beta)

    # --- TRL: its fused-head log-probs and reference pass (both in the setup), and _compute_loss
    trl_c, trl_r = setup.trl_logps.chunk(2, dim=0)
    trl_ref_c, trl_ref_r = setup.trl_ref
    _use_objective(trainer, [("sigmoid", 1.0)], {})
    setup.policy.zero_grad(set_to_none=True)
    trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    trl_loss.backward()
    trl_grads = _grads(setup.policy)
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}  # the model is in eval mode
    # --- the gradient of every policy parameter: TRL's backward, and ours through our scorer at TRL's log-prob values
    # (the sums agree to a few float32 ulps, checked above; this checks d logps / d theta)
    logps = sequence_logps(setup.policy, batch)[0]
    logps = logps + (setup.trl_logps - logps).detach()
    preference_loss("sigmoid", *split_pair_logps(logps), trl_ref_c, trl_ref_r, beta=beta).losses.mean().backward()
    our_grads = _grads(setup.policy)

    same_ids = torch.equal(inputs["input_ids"], batch.input_ids) and torch.equal(
        inputs["completion_mask"][:, 1:].bool(), batch.response_mask[:, 1:]
    )
    if not same_ids:
        report.failures.append("token ids or response masks differ between TRL's collated batch and ours")
    report.check("policy logps/chosen", pol_c, trl_c)
    report.check("policy logps/rejected", pol_r, trl_r)
    report.check("ref table logps/chosen", ref_c, trl_ref_c)
    report.check("ref table logps/rejected", ref_r, trl_ref_r)
    report.check("ref live logps/chosen", live_c, trl_ref_c)
    report.check("ref live logps/rejected", live_r, trl_ref_r)
    report.check("rewards/chosen", ours.chosen_rewards, beta * (trl_c - trl_ref_c))
    report.check("rewards/rejected", ours.rejected_rewards, beta * (trl_r - trl_ref_r))
    report.check("loss", ours.losses.mean(), trl_loss.detach())
    report.check("shared-prompt rows: policy logps/chosen", shared_c, trl_c)
    report.check("shared-prompt rows: policy logps/rejected", shared_r, trl_r)
    report.check("shared-prompt rows: rewards/chosen", ours_shared.chosen_rewards, beta * (trl_c - trl_ref_c))
    report.check("shared-prompt rows: rewards/rejected", ours_shared.rejected_rewards, beta * (trl_r - trl_ref_r))
    report.check("shared-prompt rows: loss", ours_shared.losses.mean(), trl_loss.detach())
    report.check("rewards/chosen (mean)", ours.chosen_rewards.mean(), metrics["rewards/chosen"])
    report.check("rewards/rejected (mean)", ours.rejected_rewards.mean(), metrics["rewards/rejected"])
    report.check("logps/chosen (mean)", pol_c.mean(), metrics["logps/chosen"])
    report.check("logps/rejected (mean)", pol_r.mean(), metrics["logps/rejected"])
    # the parts LD-DPO and WPO read: sums over the shared length (policy, and our reference table), WPO's sums
    report.check("policy shared-length logps", setup.ours.shared_logps, setup.trl_shared)
    report.check("ref table shared-length logps/chosen", setup.ref_shared[0], setup.trl_ref_shared[0])
    report.check("ref table shared-length logps/rejected", setup.ref_shared[1], setup.trl_ref_shared[1])
    report.check("policy WPO sums", setup.ours.wpo_logps, setup.trl_wpo)
    if our_grads.keys() != trl_grads.keys():
        report.failures.append(f"gradients reach different parameters: {sorted(our_grads.keys() ^ trl_grads.keys())}")
    for name in sorted(our_grads.keys() & trl_grads.keys()):
        report.check_max(f"grad {name}", our_grads[name], trl_grads[name])
    return report


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient by name (a copy), the gradients then cleared."""
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


# TRL's names of our f-divergences (DPOConfig.f_divergence_type)
TRL_F_DIVERGENCE = {"reverse_kl": "reverse_kl", "forward_kl": "forward_kl", "js": "js_divergence",
                    "alpha": "alpha_divergence"}
# objectives whose rewards we report per token (beta * log-ratio / |y|); TRL reports beta * log-ratio for all
PER_TOKEN_REWARDS = ("ipo", "sigmoid_norm")
# every objective TRL's DPOTrainer has, as (label, objective, settings); `sft` is left out: TRL averages its NLL over
# all chosen tokens of the batch, ours per pair (dpo_core.losses.sft_loss)
OBJECTIVE_CASES: list[tuple[str, list[tuple[str, float]], dict]] = [
    *((name, [(name, 1.0)], {}) for name in ("sigmoid", "hinge", "ipo", "sigmoid_norm", "nca_pair", "bco_pair",
                                             "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop")),
    ("robust, label_smoothing=0.1", [("robust", 1.0)], {"label_smoothing": 0.1}),
    ("exo_pair, label_smoothing=1e-3", [("exo_pair", 1.0)], {"label_smoothing": 1e-3}),
    ("aot, label_smoothing=0.1", [("aot", 1.0)], {"label_smoothing": 0.1}),
    ("discopop, tau=0.5", [("discopop", 1.0)], {"discopop_tau": 0.5}),
    ("sigmoid, f_divergence=forward_kl", [("sigmoid", 1.0)], {"f_divergence": "forward_kl"}),
    ("sigmoid, f_divergence=js", [("sigmoid", 1.0)], {"f_divergence": "js"}),
    ("sigmoid, f_divergence=alpha, f_alpha=0.3", [("sigmoid", 1.0)], {"f_divergence": "alpha", "f_alpha": 0.3}),
    ("ipo, f_divergence=js", [("ipo", 1.0)], {"f_divergence": "js"}),
    ("0.8 sigmoid + 0.2 bco_pair (MPO)", [("sigmoid", 0.8), ("bco_pair", 0.2)], {}),
    ("sigmoid, use_weighting (WPO)", [("sigmoid", 1.0)], {"use_weighting": True}),
    ("sigmoid, ld_alpha=0.5 (LD-DPO)", [("sigmoid", 1.0)], {"ld_alpha": 0.5}),
    ("ipo, ld_alpha=0.3, use_weighting", [("ipo", 1.0)], {"ld_alpha": 0.3, "use_weighting": True}),
]
# the reference-free objectives of TRL's experimental ORPOTrainer / CPOTrainer, as (label, loss, settings)
REFERENCE_FREE_CASES: list[tuple[str, str, dict]] = [
    ("orpo", "orpo", {}),
    ("cpo", "cpo", {}),
    ("cpo, cpo_alpha=0.5, label_smoothing=0.1", "cpo", {"cpo_alpha": 0.5, "label_smoothing": 0.1}),
]


def _use_objective(trainer, objective: list[tuple[str, float]], settings: dict) -> None:
    """Point the trainer's ``_compute_loss`` at ``objective`` with our ``settings``, as the ``DPOConfig`` fields of the
    same meaning would (``loss_type``, ``loss_weights``, ``label_smoothing``, ``f_divergence_type``, ...)."""
    trainer.loss_types, trainer.loss_weights = [name for name, _ in objective], [w for _, w in objective]
    trainer.label_smoothing = settings.get("label_smoothing", 0.0)
    trainer.f_divergence_type = TRL_F_DIVERGENCE[settings.get("f_divergence", "reverse_kl")]
    trainer.f_alpha_divergence_coef = settings.get("f_alpha", 0.5)
    trainer.args.discopop_tau = settings.get("discopop_tau", 0.05)
    trainer.use_weighting, trainer.ld_alpha = settings.get("use_weighting", False), settings.get("ld_alpha")


def objective_parity(setup: Setup, objective: list[tuple[str, float]], **settings) -> ParityReport:
    """An objective (one loss, or a weighted mixture) on the setup's batch: TRL's ``_compute_loss`` with
    ``loss_type`` / ``loss_weights`` set to it against our ``mixture_loss``: the loss, the mean rewards and the
    gradient of the loss with respect to every sequence's log-prob sum.

    Both see the same log-probs, TRL's: its ``_compute_loss`` replays the setup's fused-head forward (per-token
    log-probs as a leaf tensor) with the reference log-probs given as precomputed, and ours gets the sums as leaf
    tensors. d loss / d theta = sum over sequences of d loss / d logps times d logps / d theta, and ``run`` checks
    that d logps / d theta, the policy's gradient through our scorer, equals TRL's; so equal d loss / d logps here
    means equal parameter gradients, without a forward and backward of the model per objective. (The few-ulp
    differences of log-prob sums in the thousands would otherwise be amplified by the steeper objectives, SPPO,
    DiscoPOP and the f-divergences, into differences above the tolerance.)

    ``settings`` are ours (``label_smoothing``, ``f_divergence``, ``f_alpha``, ``discopop_tau``, ``use_weighting``,
    ``ld_alpha``); they are set on the trainer where its ``DPOConfig`` fields of the same meaning put them. WPO's
    weights come from each side's own scores (``Setup.ours``, TRL's replayed output).
    """
    from dpo_core.logprobs import split_pair_logps
    from dpo_core.losses import ld_logps, mixture_loss, wpo_weights

    trainer, beta = setup.trainer, setup.beta
    _use_objective(trainer, objective, settings)
    use_weighting, ld_alpha = settings.pop("use_weighting", False), settings.pop("ld_alpha", None)
    ref_c, ref_r = setup.trl_ref
    if ld_alpha is not None:  # precomputed as TRL's `compute_ref_log_probs` would with `ld_alpha`
        ref_c, ref_r = (ld_logps(t, shared, ld_alpha) for t, shared in zip(setup.trl_ref, setup.trl_ref_shared))
    token_logps = setup.trl_out.log_probs.detach().clone().requires_grad_(True)
    replay = copy.copy(setup.trl_out)
    replay.log_probs = token_logps
    inputs = {**setup.inputs, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    trainer.precompute_ref_logps = True
    try:
        with _replayed_forward(trainer.model, replay):
            trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    finally:
        trainer.precompute_ref_logps = False
    trl_loss.backward()
    # the gradient on a sequence's first response token: d loss / d its sum (the shared part's, for LD-DPO)
    first = inputs["completion_mask"][:, 1:].argmax(dim=1)
    trl_dlogps = token_logps.grad[torch.arange(first.shape[0]), first]
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}  # the model is in eval mode

    total = setup.trl_logps.detach().clone().requires_grad_(True)
    shared = setup.trl_shared.detach().clone().requires_grad_(True)
    logps = total if ld_alpha is None else ld_logps(total, shared, ld_alpha)
    tokens = split_pair_logps(setup.ours.counts)
    weights = wpo_weights(*split_pair_logps(setup.ours.wpo_logps), *tokens) if use_weighting else None
    ours = mixture_loss(objective, *split_pair_logps(logps), ref_c, ref_r, beta=beta, chosen_tokens=tokens[0],
                        rejected_tokens=tokens[1], pair_weights=weights, **settings)
    ours.losses.mean().backward()
    our_dlogps = total.grad + (shared.grad if shared.grad is not None else 0.0)

    report = ParityReport()
    report.check("loss", ours.losses.mean(), trl_loss.detach())
    chosen_r, rejected_r = ours.chosen_rewards, ours.rejected_rewards
    if objective[0][0] in PER_TOKEN_REWARDS:  # back to TRL's beta * log-ratio of the sums
        chosen_r, rejected_r = chosen_r * tokens[0], rejected_r * tokens[1]
    report.check("rewards/chosen (mean)", chosen_r.mean(), metrics["rewards/chosen"])
    report.check("rewards/rejected (mean)", rejected_r.mean(), metrics["rewards/rejected"])
    report.check("d loss / d logps", our_dlogps, trl_dlogps)
    return report


def reference_free_parity(setup: Setup, loss: str, **settings) -> ParityReport:
    """ORPO or CPO on the setup's log-prob sums (TRL's values, as in ``objective_parity``): our ``preference_loss``
    against the loss function of TRL's experimental ``ORPOTrainer`` (``odds_ratio_loss``, on token-averaged
    log-probs) or ``CPOTrainer`` (``cpo_loss``, ``loss_type="sigmoid"``): the preference term's mean, its gradient
    with respect to each log-prob sum, and the rewards.

    The NLL term on the chosen answer is left out of the comparison: TRL averages it over all chosen tokens of the
    batch, ours per pair (``dpo_core.losses.orpo_loss``), and so they differ when the lengths do.
    """
    import types
    import warnings

    from dpo_core.logprobs import split_pair_logps
    from dpo_core.losses import preference_loss

    with warnings.catch_warnings():  # trl.experimental announces itself
        warnings.simplefilter("ignore")
        from trl.experimental.cpo.cpo_trainer import CPOTrainer
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    beta, alpha, eps = setup.beta, settings.get("cpo_alpha", 1.0), settings.get("label_smoothing", 0.0)
    tokens = split_pair_logps(setup.ours.counts)
    trl_self = types.SimpleNamespace(beta=beta, alpha=0.0, loss_type="sigmoid", label_smoothing=eps,
                                     accelerator=types.SimpleNamespace(device="cpu"))
    sums = [t.detach().clone().requires_grad_(True) for t in split_pair_logps(setup.trl_logps)]
    if loss == "orpo":
        terms, trl_chosen_r, trl_rejected_r, *_ = ORPOTrainer.odds_ratio_loss(
            trl_self, sums[0] / tokens[0], sums[1] / tokens[1])
        trl_term = -terms.mean()  # ORPOTrainer: loss = nll - mean(beta log sigma(log odds))
    else:
        terms, trl_chosen_r, trl_rejected_r = CPOTrainer.cpo_loss(trl_self, *sums)
        trl_term = terms.mean()  # CPOTrainer: loss = mean(terms) + cpo_alpha * nll
    trl_term.backward()
    trl_grads = torch.cat([t.grad for t in sums])

    ours_sums = [t.detach().clone().requires_grad_(True) for t in split_pair_logps(setup.trl_logps)]
    out = preference_loss(loss, *ours_sums, None, None, beta=beta, chosen_tokens=tokens[0], rejected_tokens=tokens[1],
                          **settings)
    nll = -ours_sums[0] / tokens[0]
    our_term = (out.losses - (1.0 if loss == "orpo" else alpha) * nll).mean()
    our_term.backward()

    report = ParityReport()
    report.check(f"{loss} preference term", our_term, trl_term.detach())
    report.check("d term / d logps", torch.cat([t.grad for t in ours_sums]), trl_grads)
    report.check("rewards/chosen", out.chosen_rewards, trl_chosen_r)
    report.check("rewards/rejected", out.rejected_rewards, trl_rejected_r)
    return report


# KTO against TRL's KTOTrainer, as (label, settings)
KTO_CASES: list[tuple[str, dict]] = [
    ("kto", {}),
    ("kto, desirable_weight=1.33, undesirable_weight=0.8", {"desirable_weight": 1.33, "undesirable_weight": 0.8}),
    ("kto, KL reference point clamped at 0", {"kl_shift": -1e3}),
]


def kto_rows(rows: list[dict]) -> tuple[list[dict], torch.Tensor]:
    """The setup's pairs as 2B unpaired KTO rows, laid out as pair rows (``dpo_data.unpaired``): every chosen
    answer (label True) then every rejected one (label False), each with the completion of the row before it as its
    mismatched KL completion (TRL's rotation by one within the batch); and the labels, Bool[2B]."""
    completions = [(r["prompt_ids"], r["chosen_ids"], True) for r in rows]
    completions += [(r["prompt_ids"], r["rejected_ids"], False) for r in rows]
    out = [{"pair_id": str(i), "prompt_ids": prompt, "chosen_ids": answer,
            "rejected_ids": completions[i - 1][1]} for i, (prompt, answer, _) in enumerate(completions)]
    return out, torch.tensor([label for *_, label in completions])


def kto_parity(setup: Setup, **settings) -> ParityReport:
    """KTO on the setup's pairs split into 2B unpaired rows (``kto_rows``): TRL ``KTOTrainer._compute_loss`` against
    our ``kto_kl`` + ``kto_loss``: the loss, the mean rewards of the desirable and undesirable rows, the KL reference
    point and the gradient of the loss with respect to every completion's log-prob sum.

    Both get the same log-prob sums: ours, of the tiny policy and reference on the (prompt, completion) and the
    mismatched (prompt, KL completion) sequences (``run`` checks that our scorer equals TRL's on any such sequence).
    TRL's ``_compute_loss`` runs as a plain function on a stand-in trainer (its attributes from the ``KTOConfig``
    fields of the same names) whose model returns those sums as one-token sequences, with the reference log-probs
    given as precomputed; the gradient on the completion sums then carries to the parameters as in
    ``objective_parity``. ``kl_shift`` (ours, for the test only) lowers the reference's KL log-probs by that much,
    so that the KL estimate is negative and clamped at 0.
    """
    import types
    from collections import defaultdict

    from trl import KTOTrainer

    from dpo_core.batching import collate_pairs
    from dpo_core.logprobs import sequence_logps, split_pair_logps
    from dpo_core.losses import kto_kl, kto_loss
    from dpo_core.models import pad_id

    beta, trainer = setup.beta, setup.trainer
    shift = settings.pop("kl_shift", 0.0)
    weights = {"desirable_weight": settings.pop("desirable_weight", 1.0),
               "undesirable_weight": settings.pop("undesirable_weight", 1.0)}
    rows, labels = kto_rows(setup.rows)
    batch = collate_pairs(rows, pad_id(trainer.processing_class))
    with torch.no_grad():
        policy, policy_kl = split_pair_logps(sequence_logps(setup.policy, batch)[0])
        ref, ref_kl = split_pair_logps(sequence_logps(trainer.ref_model, batch)[0])
    ref_kl = ref_kl - shift

    n = len(rows)
    token_logps = {"": policy.clone().unsqueeze(1).requires_grad_(True),
                   "KL_": policy_kl.clone().unsqueeze(1).requires_grad_(True)}
    ones = torch.ones(n, 2, dtype=torch.long)
    inputs = {"input_ids": torch.zeros(n, 2, dtype=torch.long), "attention_mask": ones,
              "completion_mask": torch.tensor([[0, 1]] * n), "KL_input_ids": torch.zeros(n, 2, dtype=torch.long),
              "KL_attention_mask": ones, "KL_completion_mask": torch.tensor([[0, 1]] * n), "label": labels,
              "ref_logps": ref, "ref_KL_logps": ref_kl}

    def model(**kwargs):  # one-token sequences whose log-prob is the sum of the whole completion's
        kind = "KL_" if kwargs["input_ids"] is inputs["KL_input_ids"] else ""
        zeros = torch.zeros(n, 1)
        return types.SimpleNamespace(log_probs=token_logps[kind], entropy=zeros, mean_logits=zeros)

    accelerator = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x)
    trl_self = types.SimpleNamespace(model=types.SimpleNamespace(training=False), accelerator=accelerator,
                                     calculate_KL=True, aux_loss_enabled=False, precompute_ref_logps=True,
                                     loss_type="kto", beta=beta, _metrics=defaultdict(lambda: defaultdict(list)),
                                     _total_train_tokens=0,
                                     **weights)
    trl_self._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trl_self)
    trl_loss = KTOTrainer._compute_loss(trl_self, model, inputs, return_outputs=False)
    trl_loss.backward()
    metrics = {k: v[-1] for k, v in trl_self._metrics["eval"].items()}

    ours_logps = policy.clone().requires_grad_(True)
    ours_kl_logps = policy_kl.clone().requires_grad_(True)
    out = kto_loss(ours_logps, ref, labels, kto_kl(ours_kl_logps, ref_kl), beta=beta, **weights)
    out.losses.mean().backward()

    report = ParityReport()
    report.check("loss", out.losses.mean(), trl_loss.detach())
    report.check("rewards/chosen (mean)", out.rewards[labels].mean(), metrics["rewards/chosen"])
    report.check("rewards/rejected (mean)", out.rewards[~labels].mean(), metrics["rewards/rejected"])
    report.check("kl", out.kl, metrics["kl"])
    report.check("d loss / d logps", ours_logps.grad, token_logps[""].grad.squeeze(1))
    if ours_kl_logps.grad is not None or token_logps["KL_"].grad is not None:
        report.failures.append("a gradient reached the KL completions' log-probs (the reference point is detached)")
    return report


@contextmanager
def _replayed_forward(model: torch.nn.Module, output) -> Iterator[None]:
    """Calls of ``model`` return ``output`` instead of running the network (the instance's ``forward`` is swapped)."""
    saved = model.__dict__.get("forward")
    model.forward = lambda *args, **kwargs: output
    try:
        yield
    finally:
        if saved is None:
            del model.forward
        else:
            model.forward = saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--objectives", action="store_true",
                        help="also check every objective TRL has (loss, rewards, gradients; see objective_parity)")
    args = parser.parse_args(argv)
    print(f"model: {args.model}, pairs: {args.pairs}")
    with trl_setup(args.model, args.pairs) as setup:
        report = run(setup=setup)
        print(report.render())
        ok = report.ok
        if args.objectives:
            print(f"\n{'objective':<44}{'loss':>12}{'TRL loss':>12}{'|diff|':>10}{'max |diff| dL/dlogps':>22}  ok")
            for label, objective, settings in OBJECTIVE_CASES:
                one = objective_parity(setup, objective, **settings)
                _, ours, trl, diff = one.rows[0]
                grad = max(r[3] for r in one.rows if r[0].startswith("d loss"))
                print(f"{label:<44}{ours:>12.6f}{trl:>12.6f}{diff:>10.2e}{grad:>22.2e}  {one.ok}")
                ok = ok and one.ok
            for label, loss, settings in REFERENCE_FREE_CASES:
                one = reference_free_parity(setup, loss, **settings)
                _, ours, trl, diff = one.rows[0]
                grad = max(r[3] for r in one.rows if r[0].startswith("d term"))
                print(f"{label + ' (term)':<44}{ours:>12.6f}{trl:>12.6f}{diff:>10.2e}{grad:>22.2e}  {one.ok}")
                ok = ok and one.ok
            for label, settings in KTO_CASES:
                one = kto_parity(setup, **settings)
                _, ours, trl, diff = one.rows[0]
                grad = max(r[3] for r in one.rows if r[0].startswith("d loss"))
                print(f"{label:<44}{ours:>12.6f}{trl:>12.6f}{diff:>10.2e}{grad:>22.2e}  {one.ok}")
                ok = ok and one.ok
            print("OBJECTIVES OK" if ok else "OBJECTIVES FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
