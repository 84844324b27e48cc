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
  against `dpo_core.losses.preference_loss("sigmoid", ...)`.

Tolerance: |ours - TRL| <= ATOL + RTOL * |TRL| with ATOL = RTOL = 1e-4 (log-prob sums over ~100 tokens are in the
hundreds; float32 summation order alone moves them by ~1e-5 relative).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
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


def run(kind: str = "tiny", n_pairs: int = 4, beta: float = 0.1) -> ParityReport:
    from trl import DPOConfig, DPOTrainer

    from bench.trl_dpo import conversational_dataset
    from dpo_core.batching import collate_pairs, share_prompt_pairs
    from dpo_core.losses import preference_loss
    from dpo_core.logprobs import sequence_logps, split_pair_logps
    from dpo_core.models import DeviceSpec, pad_id
    from dpo_core.reference import compute_reference_logps

    torch.manual_seed(0)
    s = BenchSettings(steps=1, batch_size=n_pairs, beta=beta)
    path = model_dir()
    tokenizer = load_tokenizer(path)
    data = load_bench_data(tokenizer, s, n_pairs)
    policy, reference = _models(kind, tokenizer, path)
    policy.float().eval()
    reference.float().eval()
    report = ParityReport()

    # --- ours: precomputed reference table, live reference, policy log-probs, loss
    spec = DeviceSpec(device=torch.device("cpu"), dtype=torch.float32, autocast_dtype=None, attn_implementation="sdpa")
    ref_table = compute_reference_logps(reference, data.tokenized, batch_size=2, spec=spec)
    rows = data.tokenized.to_dict("records")
    pad = pad_id(tokenizer)
    batch = collate_pairs(rows, pad)
    with torch.no_grad():
        pol_c, pol_r = split_pair_logps(sequence_logps(policy, batch)[0])
        live_c, live_r = split_pair_logps(sequence_logps(reference, batch)[0])
        # the trainer's default layout: one row prompt + chosen + rejected per pair
        shared_c, shared_r = split_pair_logps(sequence_logps(policy, share_prompt_pairs(rows, pad))[0])
    ref_c = torch.tensor(ref_table.chosen_logps.to_numpy(), dtype=torch.float32)
    ref_r = torch.tensor(ref_table.rejected_logps.to_numpy(), dtype=torch.float32)
    ours = preference_loss("sigmoid", pol_c, pol_r, ref_c, ref_r, beta=beta)
    ours_shared = preference_loss("sigmoid", shared_c, shared_r, ref_c, ref_r, beta=beta)

    # --- TRL: its tokenization, collator, fused-head log-probs, reference pass and _compute_loss
    with tempfile.TemporaryDirectory(prefix="bench-parity-") as out_dir:
        args = DPOConfig(
            output_dir=out_dir, per_device_train_batch_size=n_pairs, max_length=s.max_length, beta=beta,
            loss_type=["sigmoid"], bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
            report_to="none", save_strategy="no", disable_tqdm=True, precompute_ref_log_probs=False,
        )  # fmt: skip
        trainer = DPOTrainer(
            model=policy, ref_model=reference, args=args, train_dataset=conversational_dataset(data),
            processing_class=tokenizer,
        )  # fmt: skip
        examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
        inputs = trainer.data_collator(examples)
        trainer.model.eval()
        with torch.no_grad():
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            out = trainer.model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                fused_lm_head=True, use_cache=False,
            )  # fmt: skip
            trl_c, trl_r = out.log_probs.sum(dim=1).chunk(2, dim=0)
            trl_ref_c, trl_ref_r = trainer.compute_ref_log_probs(trainer.ref_model, inputs)
            trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
        metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}  # the model is in eval mode

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
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args(argv)
    report = run(args.model, args.pairs)
    print(f"model: {args.model}, pairs: {args.pairs}")
    print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
