"""MLflow model registry: log the trained policy (transformers flavour, chat task), register it behind a promotion
gate that scores the candidate and the current champion head to head.

    gate = gate_comparison(candidate_scores, champion_scores, beta=..., champion_version=..., gate_set_id=...)
    result = register_policy(cfg, run_id=..., model_dir=train_result.model_dir, metrics={...}, fingerprint=...,
                             config_hash=cfg.config_hash(), flow_run_id=..., gate=gate)

- Every new version gets the alias `candidate`.
- The gate: the candidate and the champion (loaded from `models:/<name>@champion`) are scored in the same flow run on
  the same gate pairs, with the same reference log-probs and the same judge (`gate_comparison`). `champion` moves to
  the new version only when its gate accuracy and its judge win rate are each not worse than the champion's by more
  than `cfg.registry.promotion_tolerance` (`promotion_decision`). Both numbers, their paired difference with a
  bootstrap CI and the reason go to the version's tags, the run's tags and a JSON artifact
  `registry/decision-v<N>.json` on the run. The first version becomes champion.
- Every version carries its gate set (`gate/pairs.parquet` on its run, tag `gate_set_id`) and the ids of the pairs it
  trained on (`lineage/train_pair_ids.txt`, tag `train_fingerprint`), so the next run can pin the same gate pairs and
  tell whether anything is new (`champion_info`, `download_run_file`).
- Idempotent: a version whose `config_hash` and `data_fingerprint` tags match is returned as it is (a re-run of a
  cached flow never creates a duplicate). A version left half-registered by a crash (no decision tag yet) is
  finished, not duplicated.

Load it back with `mlflow.transformers.load_model("models:/dpo-policy@champion")` (a transformers pipeline) or
`mlflow.pyfunc.load_model(...)` (OpenAI-style chat: `predict({"messages": [...], "max_tokens": 64})`), or as a plain
Hugging Face folder with `download_model_version`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dpo_core.config import RunConfig
from dpo_core.metrics import bootstrap_ci, win_rate
from tracking.retry import RetryPolicy
from tracking.tracker import RunTracker, as_number, tracking_uri

log = logging.getLogger(__name__)

# the flat keys tasks.register.gate_metrics produces (the candidate's own held-out metrics, kept as version tags)
ACCURACY_METRIC = "eval_reward_accuracy"  # held-out preference (implicit reward) accuracy on the main eval set
WIN_RATE_METRIC = "win_rate"  # the judge's policy-vs-reference win rate from the generation comparison
METRIC_TAG_PREFIX = "metric."  # every candidate metric is a version tag `metric.<key>`
GATE_METRICS = ("accuracy", "win_rate")  # what the head-to-head gate compares
CANDIDATE, CHAMPION = "candidate", "champion"
LOGGED_MODEL_NAME = "policy"
TASK = "llm/v1/chat"
# Tags written on every version.
TAG_FINGERPRINT, TAG_CONFIG_HASH = "data_fingerprint", "config_hash"
TAG_TRAIN_FINGERPRINT, TAG_GATE_SET = "train_fingerprint", "gate_set_id"
TAG_DECISION = "promotion.decision"
# Files on every version's run: the gate pairs it was judged on, the ids of its train pairs, its data profile.
GATE_PAIRS_FILE = "gate/pairs.parquet"
TRAIN_IDS_FILE, PROFILE_FILE = "lineage/train_pair_ids.txt", "lineage/profile.json"
INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "Give me one tip for writing clear code."}], "max_tokens": 16}
PAIR_SCORE_COLUMNS = ("pair_id", "policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
                      "reference_rejected_logps")


@dataclass(frozen=True)
class RegistrationResult:
    name: str
    version: str
    promoted: bool  # this version holds `champion` after the call
    champion_version: str | None  # the version holding `champion` after the call
    decision: dict[str, Any]
    model_uri: str  # models:/<name>/<version>
    reused: bool = False  # True: an existing version with the same config hash + data fingerprint was returned
    metrics: dict[str, float] = field(default_factory=dict)


def _correct(scores: pd.DataFrame, beta: float) -> np.ndarray:
    """1.0 where the implicit reward of chosen beats rejected strictly (TRL's rewards/accuracies), else 0.0."""
    chosen = beta * (scores["policy_chosen_logps"].to_numpy() - scores["reference_chosen_logps"].to_numpy())
    rejected = beta * (scores["policy_rejected_logps"].to_numpy() - scores["reference_rejected_logps"].to_numpy())
    return (chosen > rejected).astype(np.float64)


def _points(policy: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per prompt: 1 for a judge win over the reference answer, 0.5 for a tie, 0 for a loss (dpo_core win_rate)."""
    _, winners = win_rate(policy, reference)
    return np.array([{"policy": 1.0, "tie": 0.5, "reference": 0.0}[w] for w in winners])


def gate_comparison(candidate: pd.DataFrame, champion: pd.DataFrame | None, *, beta: float,
                    champion_version: str | None, gate_set_id: str, candidate_judge: pd.DataFrame | None = None,
                    champion_judge: pd.DataFrame | None = None, judge: str | None = None,
                    bootstrap_samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """The candidate and the champion scored head to head on the same gate pairs, as a pure function.

    `candidate` / `champion`: one row per gate pair (PAIR_SCORE_COLUMNS: each model's summed log-probs of chosen and
    rejected, and the same reference's); both must hold the same pair ids and the same reference values.
    `candidate_judge`: the generation comparison on gate prompts (`pair_id`, `policy_judge_score`,
    `reference_judge_score`); `champion_judge`: the champion's answers to the same prompts scored by the same judge
    (`pair_id`, `judge_score`). Accuracy is the implicit reward accuracy; the win rate counts a judge win over the
    same reference answer 1, a tie 1/2. `paired` holds per metric the mean per-pair difference (candidate - champion)
    with a percentile bootstrap CI over pairs (`dpo_core.evaluation.bootstrap_ci`).
    """
    missing = [c for c in PAIR_SCORE_COLUMNS if c not in candidate.columns]
    if missing or candidate.empty:
        raise ValueError(f"gate comparison: the candidate's gate scores are empty or lack {missing}")
    cand = candidate.set_index("pair_id").sort_index()
    out: dict[str, Any] = {"gate_set_id": gate_set_id, "n_pairs": len(cand), "pair_ids": list(cand.index),
                           "champion_version": champion_version, "judge": judge, "confidence": confidence,
                           "candidate": {}, "champion": None, "paired": {}}
    per_metric: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    champ = None
    if champion is not None:
        champ = champion.set_index("pair_id").sort_index()
        if list(champ.index) != list(cand.index):
            raise ValueError(f"gate comparison: the champion was scored on other pairs ({len(champ)}) than the "
                             f"candidate ({len(cand)}); both must use the same gate set")
        same_ref = np.allclose(champ[["reference_chosen_logps", "reference_rejected_logps"]].to_numpy(),
                               cand[["reference_chosen_logps", "reference_rejected_logps"]].to_numpy())
        if not same_ref:
            raise ValueError("gate comparison: the champion was scored against other reference log-probs")
    per_metric["accuracy"] = (_correct(cand.reset_index(), beta),
                              _correct(champ.reset_index(), beta) if champ is not None else None)
    if candidate_judge is not None and len(candidate_judge):
        judged = candidate_judge.set_index("pair_id")
        reference = judged["reference_judge_score"].to_numpy(dtype=float)
        cand_points = _points(judged["policy_judge_score"].to_numpy(dtype=float), reference)
        champ_points = None
        if champion_judge is not None:
            champ_scores = champion_judge.set_index("pair_id").reindex(judged.index)["judge_score"]
            if champ_scores.isna().any():
                raise ValueError("gate comparison: the champion's answers do not cover the candidate's gate prompts")
            champ_points = _points(champ_scores.to_numpy(dtype=float), reference)
        per_metric["win_rate"] = (cand_points, champ_points)
        out["n_prompts"] = len(judged)
    for name, (cand_values, champ_values) in per_metric.items():
        out["candidate"][name] = float(cand_values.mean())
        if champ_values is None:
            continue
        out["champion"] = out["champion"] or {}
        out["champion"][name] = float(champ_values.mean())
        diff = cand_values - champ_values
        low, high = bootstrap_ci(diff, bootstrap_samples, confidence, seed)
        out["paired"][name] = {"difference": float(diff.mean()), "ci_low": low, "ci_high": high}
    return out


def promotion_decision(gate: Mapping[str, Any], *, tolerance: float) -> dict[str, Any]:
    """The promotion rule, as a pure function of a `gate_comparison` result. Returns {'promote', 'reason', 'checks',
    ...}.

    Promote when there is no champion; otherwise when, for every metric both sides have (accuracy always, the win
    rate when generations were judged), the candidate's number is >= the champion's - tolerance. The paired CI is
    recorded beside each check (with a few dozen gate pairs it is wide: read it before trusting a small difference).
    """
    version = gate.get("champion_version")
    decision: dict[str, Any] = {"tolerance": tolerance, "champion_version": version, "checks": {},
                                "gate_set_id": gate.get("gate_set_id"), "n_pairs": gate.get("n_pairs")}
    champion = gate.get("champion")
    if version is None or champion is None:
        return {**decision, "promote": True, "reason": "first version: no champion yet"}
    notes: list[str] = []
    for key in GATE_METRICS:
        if key not in gate["candidate"] or key not in champion:
            if key in gate["candidate"] or key in champion:
                notes.append(f"{key} not compared (missing on one side)")
            continue
        paired = gate["paired"][key]
        delta = paired["difference"]
        passed = delta >= -tolerance - 1e-12
        decision["checks"][key] = {"candidate": gate["candidate"][key], "champion": champion[key], "delta": delta,
                                   "ci_low": paired["ci_low"], "ci_high": paired["ci_high"], "passed": passed}
        notes.append(f"{key} {gate['candidate'][key]:.4f} vs {champion[key]:.4f} (paired difference {delta:+.4f}, "
                     f"{gate.get('confidence', 0.95):.0%} CI {paired['ci_low']:+.4f} to {paired['ci_high']:+.4f}; "
                     f"{'ok' if passed else f'worse than -{tolerance}'})")
    if "accuracy" not in decision["checks"]:
        raise ValueError("promotion gate: the gate comparison has no accuracy on both sides")
    promote = all(c["passed"] for c in decision["checks"].values())
    verdict = "promoted" if promote else f"stays candidate, champion remains v{version}"
    where = f"on {gate.get('n_pairs')} gate pairs"
    return {**decision, "promote": promote, "reason": f"{verdict} ({where}): " + "; ".join(notes)}


@contextlib.contextmanager
def _mlflow_uris(uri: str) -> Iterator[None]:
    """mlflow.transformers.log_model and `models:/` resolution use the process-wide tracking and registry URIs:
    point both at `uri` for the call only, then restore what was there (unset stays unset).

    `mlflow.set_tracking_uri` / `set_registry_uri` also write MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI for
    subprocesses, so the environment is restored as well; a registry URI is only ever set together with that variable,
    which is how an unset one is told from a set one."""
    import mlflow

    previous_env = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    previous_tracking = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_tracking)
        mlflow.set_registry_uri(previous_env["MLFLOW_REGISTRY_URI"])
        for name, value in previous_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _pip_requirements() -> list[str]:
    import torch
    import transformers

    return [f"transformers=={transformers.__version__}", f"torch=={torch.__version__.split('+')[0]}", "safetensors"]


def _version_metrics(tags: Mapping[str, str]) -> dict[str, float]:
    """The eval metrics stored as `metric.<key>` tags on a version."""
    out = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                out[key[len(METRIC_TAG_PREFIX):]] = float(value)
            except ValueError:
                log.warning("version tag %s=%r is not a number; ignored by the promotion gate", key, value)
    return out


def _check_inputs(model_dir: Path, metrics: Mapping[str, Any], fingerprint: str, config_hash: str,
                  accuracy_key: str) -> dict[str, float]:
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"register_policy: {model_dir} is not a Hugging Face model folder (no config.json)")
    if not any(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"register_policy: {model_dir} holds no *.safetensors weights")
    for name, value in (("fingerprint", fingerprint), ("config_hash", config_hash)):
        if not value or "'" in value:
            raise ValueError(f"register_policy: {name} must be a non-empty string without quotes, got {value!r}")
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        number = as_number(value)
        if number is None or not math.isfinite(number):
            raise ValueError(f"register_policy: metric '{key}' must be a finite number, got {value!r}")
        flat[key] = number
    if accuracy_key not in flat:
        raise ValueError(f"register_policy: metrics lack '{accuracy_key}' (got {sorted(flat)})")
    return flat


class _Registry:
    """The registry calls, each through the tracker's retry policy."""

    def __init__(self, tracker: RunTracker, name: str) -> None:
        self.tracker, self.client, self.name = tracker, tracker.client, name

    def call(self, what: str, fn):
        return self.tracker.call(what, fn)

    def ensure_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.call("get_registered_model", lambda: self.client.get_registered_model(self.name))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            try:
                self.call("create_registered_model", lambda: self.client.create_registered_model(
                    self.name, description="DPO-aligned chat policy from the dpo pipeline; aliases: champion "
                                           "(passed the promotion gate), candidate (newest)."))
            except MlflowException as exc2:  # registered concurrently
                if exc2.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise

    def find_version(self, config_hash: str, fingerprint: str):
        query = (f"name='{self.name}' and tags.{TAG_CONFIG_HASH}='{config_hash}' "
                 f"and tags.{TAG_FINGERPRINT}='{fingerprint}'")
        versions = self.call("search_model_versions", lambda: self.client.search_model_versions(query))
        return min(versions, key=lambda v: int(v.version)) if versions else None

    def by_alias(self, alias: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.call(f"get_model_version_by_alias({alias})",
                             lambda: self.client.get_model_version_by_alias(self.name, alias))
        except MlflowException as exc:
            if exc.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                return None
            raise

    def set_alias(self, alias: str, version: str) -> None:
        self.call(f"set_registered_model_alias({alias})",
                  lambda: self.client.set_registered_model_alias(self.name, alias, version))

    def tag_version(self, version: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.call("set_model_version_tag",
                      lambda k=key, v=value: self.client.set_model_version_tag(self.name, version, k, v))


def log_policy_model(tracker: RunTracker, run_id: str, model_dir: Path, *, trust_remote_code: bool = False):
    """Log the HF folder as an MLflow transformers model (chat task, its signature, an input example) in the run's
    experiment. Returns mlflow's ModelInfo."""
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.chat_template is None:
        raise ValueError(f"the tokenizer in {model_dir} has no chat template; the chat task needs one")
    run = tracker.call("get_run", lambda: tracker.client.get_run(run_id))

    def log_it():
        # the logged model belongs to the run's experiment (mlflow would otherwise use the process's active one)
        logged = tracker.client.create_logged_model(experiment_id=run.info.experiment_id, name=LOGGED_MODEL_NAME,
                                                    source_run_id=run_id)
        with _mlflow_uris(tracker.uri):
            return mlflow.transformers.log_model(
                {"model": model, "tokenizer": tokenizer},
                name=LOGGED_MODEL_NAME,
                task=TASK,
                input_example=INPUT_EXAMPLE,
                pip_requirements=_pip_requirements(),
                run_id=run_id,
                model_id=logged.model_id,
                metadata={"source_dir": str(model_dir.resolve())},
            )

    return tracker.call("transformers.log_model", log_it)


def champion_info(cfg: RunConfig, tracker: RunTracker | None = None) -> dict[str, Any] | None:
    """The version holding `champion` under cfg.registry.model_name: {name, version, run_id, model_uri, tags}, or
    None when the model or the alias does not exist yet."""
    tracker = tracker or RunTracker(cfg)
    reg = _Registry(tracker, cfg.registry.model_name)
    champion = reg.by_alias(CHAMPION)
    if champion is None:
        return None
    return {"name": reg.name, "version": str(champion.version), "run_id": champion.run_id,
            "model_uri": f"models:/{reg.name}/{champion.version}", "source": champion.source,
            "tags": dict(champion.tags)}


def version_trained_on(cfg: RunConfig, *, train_fingerprint: str, config_hash: str,
                       tracker: RunTracker | None = None) -> dict[str, Any] | None:
    """The newest finished version (one with a promotion decision) trained on these train pairs with this config:
    {version, run_id, tags, champion: bool}, or None."""
    tracker = tracker or RunTracker(cfg)
    reg = _Registry(tracker, cfg.registry.model_name)
    for value in (train_fingerprint, config_hash):
        if not value or "'" in value:
            raise ValueError(f"version_trained_on: {value!r} is not a fingerprint")
    query = (f"name='{reg.name}' and tags.{TAG_TRAIN_FINGERPRINT}='{train_fingerprint}' "
             f"and tags.{TAG_CONFIG_HASH}='{config_hash}'")
    versions = [v for v in reg.call("search_model_versions", lambda: tracker.client.search_model_versions(query))
                if TAG_DECISION in v.tags]
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    champion = reg.by_alias(CHAMPION)
    return {"name": reg.name, "version": str(newest.version), "run_id": newest.run_id, "tags": dict(newest.tags),
            "champion": champion is not None and str(champion.version) == str(newest.version)}


def previous_version(cfg: RunConfig, *, config_hash: str, fingerprint: str,
                     tracker: RunTracker | None = None) -> dict[str, Any] | None:
    """The newest version under cfg.registry.model_name ({version, run_id, tags}) other than one registered for this
    config hash + data fingerprint (this run's own, on a re-run), or None."""
    tracker = tracker or RunTracker(cfg)
    reg = _Registry(tracker, cfg.registry.model_name)
    versions = reg.call("search_model_versions", lambda: tracker.client.search_model_versions(f"name='{reg.name}'"))
    others = [v for v in versions
              if (v.tags.get(TAG_CONFIG_HASH), v.tags.get(TAG_FINGERPRINT)) != (config_hash, fingerprint)]
    if not others:
        return None
    newest = max(others, key=lambda v: int(v.version))
    return {"version": str(newest.version), "run_id": newest.run_id, "tags": dict(newest.tags)}


def download_run_file(tracker: RunTracker, run_id: str, path: str, dest: Path) -> Path | None:
    """One artifact file of a run, downloaded into `dest`; None when the run has no such file."""
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    listed = tracker.call("list_artifacts", lambda: tracker.client.list_artifacts(run_id, parent or None))
    if not any(a.path == path for a in listed):
        return None
    dest.mkdir(parents=True, exist_ok=True)
    return Path(tracker.call(f"download_artifacts({path})",
                              lambda: tracker.client.download_artifacts(run_id, path, str(dest))))


def log_lineage_files(tracker: RunTracker, run_id: str, *, train_ids: list[str], profile: Mapping[str, Any],
                      lineage: Mapping[str, Any], lineage_md: str, gate_pairs_file: Path) -> None:
    """What the next runs read back from a version's run: the ids of its train pairs (`TRAIN_IDS_FILE`), its data
    profile (`PROFILE_FILE`) and its gate pairs (`GATE_PAIRS_FILE`, a canonical-pairs Parquet file); plus the lineage
    report as `lineage/report.json` and `lineage/report.md`."""
    client = tracker.client
    tracker.call("log_text(train ids)", lambda: client.log_text(run_id, "\n".join(train_ids) + "\n", TRAIN_IDS_FILE))
    tracker.call("log_dict(profile)", lambda: client.log_dict(run_id, dict(profile), PROFILE_FILE))
    tracker.call("log_dict(lineage)", lambda: client.log_dict(run_id, dict(lineage), "lineage/report.json"))
    tracker.call("log_text(lineage)", lambda: client.log_text(run_id, lineage_md, "lineage/report.md"))
    if Path(gate_pairs_file).name != Path(GATE_PAIRS_FILE).name:
        raise ValueError(f"the gate pairs file must be named {Path(GATE_PAIRS_FILE).name}, got {gate_pairs_file}")
    tracker.call("log_artifact(gate pairs)", lambda: client.log_artifact(run_id, str(gate_pairs_file),
                                                                           str(Path(GATE_PAIRS_FILE).parent)))


def download_model_version(tracker: RunTracker, name: str, version: str, dest: Path) -> Path:
    """A registered version as one Hugging Face folder (weights, config, tokenizer) at `dest`.

    The transformers flavour stores the weights under `model/` and the tokenizer under `components/tokenizer/`;
    both are copied into `dest`, which `dpo_core.models.load_model` and `load_tokenizer` read."""
    import mlflow.artifacts

    dest = Path(dest)
    # the version's storage location, resolved through this tracker's client (a `models:/` URI would be resolved
    # through the process-wide registry URI)
    where = tracker.call("get_model_version_download_uri",
                          lambda: tracker.client.get_model_version_download_uri(name, version))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        local = Path(tracker.call(f"download models:/{name}/{version}", lambda: mlflow.artifacts.download_artifacts(
            artifact_uri=where, dst_path=tmp, tracking_uri=tracker.uri)))
        weights, tokenizer = local / "model", local / "components" / "tokenizer"
        if not (weights / "config.json").is_file():
            raise FileNotFoundError(f"models:/{name}/{version} holds no Hugging Face model under model/ "
                                    f"(found {sorted(p.name for p in local.iterdir())})")
        dest.mkdir(parents=True, exist_ok=True)
        for folder in (weights, tokenizer):
            for item in folder.iterdir() if folder.is_dir() else []:
                shutil.copy2(item, dest / item.name)
    return dest


def _gate_tags(gate: Mapping[str, Any]) -> dict[str, str]:
    """`gate.<metric>.<candidate|champion|difference|ci_low|ci_high>` version tags of a gate comparison."""
    tags = {}
    for metric, value in gate.get("candidate", {}).items():
        tags[f"gate.{metric}.candidate"] = repr(value)
    for metric, value in (gate.get("champion") or {}).items():
        tags[f"gate.{metric}.champion"] = repr(value)
    for metric, paired in gate.get("paired", {}).items():
        tags.update({f"gate.{metric}.{k}": repr(v) for k, v in paired.items()})
    return tags


def register_policy(cfg: RunConfig, *, run_id: str, model_dir: Path, metrics: Mapping[str, Any], fingerprint: str,
                    config_hash: str, flow_run_id: str, gate: Mapping[str, Any] | None = None,
                    tags: Mapping[str, str] | None = None, retry: RetryPolicy | None = None,
                    accuracy_key: str = ACCURACY_METRIC, tracker: RunTracker | None = None) -> RegistrationResult:
    """Log + register the policy in `model_dir` under cfg.registry.model_name, then run the promotion gate.

    `metrics`: flat {name: number} (tasks.register.gate_metrics); must hold `accuracy_key` (default
    'eval_reward_accuracy'); all become version tags `metric.<key>`. `gate`: the `gate_comparison` of this candidate
    with the champion it names (None: no head-to-head scores, so only a first version is promoted). `tags`: more
    version tags (lineage: train fingerprint, gate set id, new pairs). The champion must still be the version the
    gate scored, else the candidate is not promoted.
    Raises TrackingUnavailable when MLflow stays unreachable, ValueError/FileNotFoundError on bad input."""
    model_dir = Path(model_dir)
    flat = _check_inputs(model_dir, metrics, fingerprint, config_hash, accuracy_key)
    tracker = tracker or RunTracker(cfg, retry=retry, uri=tracking_uri(cfg))
    reg = _Registry(tracker, cfg.registry.model_name)
    reg.ensure_model()

    existing = reg.find_version(config_hash, fingerprint)
    if existing is not None and TAG_DECISION in existing.tags:
        champion = reg.by_alias(CHAMPION)
        champion_version = str(champion.version) if champion is not None else None
        version = str(existing.version)
        log.info("model %s v%s already registered for config %s + data %s; not registering again", reg.name,
                 version, config_hash, fingerprint)
        decision = json.loads(existing.tags.get("promotion.details", "{}") or "{}")
        tracker.set_tags(run_id, {"registry.model_name": reg.name, "registry.version": version,
                                  "registry.reused": "true", "registry.champion_version": champion_version or ""})
        return RegistrationResult(reg.name, version, champion_version == version,
                                  champion_version, decision, f"models:/{reg.name}/{version}", reused=True,
                                  metrics=_version_metrics(existing.tags))

    if existing is None:
        info = log_policy_model(tracker, run_id, model_dir, trust_remote_code=cfg.model.trust_remote_code)
        version_tags = {TAG_FINGERPRINT: fingerprint, TAG_CONFIG_HASH: config_hash,
                        "base_model": cfg.model.name_or_path, "flow_run_id": flow_run_id,
                        "loss": cfg.train.objective_name(),
                        **{f"{METRIC_TAG_PREFIX}{k}": repr(v) for k, v in flat.items()}, **dict(tags or {})}

        def create_version():
            with _mlflow_uris(tracker.uri):  # `models:/m-<id>` sources are resolved through the global URI
                return tracker.client.create_model_version(
                    reg.name, source=info.model_uri, run_id=run_id, tags=version_tags, model_id=info.model_id,
                    description=f"DPO ({cfg.train.objective_name()}, beta={cfg.train.beta}) of "
                                f"{cfg.model.name_or_path}; "
                                f"flow run {flow_run_id}")

        version = str(reg.call("create_model_version", create_version).version)
    else:  # created by an earlier attempt that stopped before the gate: finish it
        version = str(existing.version)
        log.info("finishing the registration of %s v%s (an earlier attempt stopped before the gate)", reg.name,
                 version)

    champion = reg.by_alias(CHAMPION)
    if champion is not None and str(champion.version) == version:
        champion = None  # cannot happen for a new version; a half-finished one that already became champion
    scored = gate.get("champion_version") if gate is not None else None
    if champion is None and scored is None:
        decision = {"promote": True, "reason": "first version: no champion yet", "champion_version": None,
                    "checks": {}, "tolerance": cfg.registry.promotion_tolerance}
    elif gate is None or scored != str(champion.version if champion is not None else None):
        now = f"v{champion.version}" if champion is not None else "none"
        decision = {"promote": False, "champion_version": str(champion.version) if champion is not None else None,
                    "checks": {}, "tolerance": cfg.registry.promotion_tolerance,
                    "reason": f"not promoted: the gate scored champion {f'v{scored}' if scored else 'none'}, the "
                              f"champion now is {now} (changed during the run, or no gate scores); run again"}
    else:
        decision = promotion_decision(gate, tolerance=cfg.registry.promotion_tolerance)
    decision["version"] = version
    current_candidate = reg.by_alias(CANDIDATE) if existing is not None else None
    if current_candidate is None or int(current_candidate.version) <= int(version):  # never move it backwards
        reg.set_alias(CANDIDATE, version)
    if decision["promote"]:
        reg.set_alias(CHAMPION, version)
    champion_version = version if decision["promote"] else decision["champion_version"]
    log.info("registry: %s v%s %s", reg.name, version, decision["reason"])

    record = {**decision, "gate": dict(gate) if gate is not None else None}
    tracker.call("log_dict(decision)", lambda: tracker.client.log_dict(run_id, record,
                                                                          f"registry/decision-v{version}.json"))
    tracker.set_tags(run_id, {"registry.model_name": reg.name, "registry.version": version,
                              "registry.promoted": str(decision["promote"]).lower(),
                              "registry.champion_version": champion_version or "",
                              "registry.reason": decision["reason"][:5000]})
    # the decision tag last: its presence marks a finished registration
    reg.tag_version(version, {**(_gate_tags(gate) if gate is not None else {}),
                              "promotion.reason": decision["reason"][:5000],
                              "promotion.details": json.dumps(decision, sort_keys=True),
                              TAG_DECISION: "promoted" if decision["promote"] else "candidate"})
    return RegistrationResult(reg.name, version, bool(decision["promote"]), champion_version, decision,
                              f"models:/{reg.name}/{version}", metrics=flat)
