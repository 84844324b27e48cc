"""MLflow model registry: log the trained policy (transformers flavour, chat task), register it behind a promotion
gate.

    result = register_policy(cfg, run_id=..., model_dir=train_result.model_dir, metrics={...}, fingerprint=...,
                             config_hash=cfg.config_hash(), flow_run_id=...)

- Every new version gets the alias `candidate`.
- `champion` moves to the new version only when, on the same evaluation set, its preference accuracy and its judge
  win rate are each not worse than the current champion's by more than `cfg.registry.promotion_tolerance`.
  The first version becomes champion. The decision and its numbers go to the version's tags, the run's tags and a
  JSON artifact `registry/decision-v<N>.json` on the run.
- Idempotent: a version whose `config_hash` and `data_fingerprint` tags match is returned as it is (a re-run of a
  cached flow never creates a duplicate). A version left half-registered by a crash (no decision tag yet) is
  finished, not duplicated.

Load it back with `mlflow.transformers.load_model("models:/dpo-policy@champion")` (a transformers pipeline) or
`mlflow.pyfunc.load_model(...)` (OpenAI-style chat: `predict({"messages": [...], "max_tokens": 64})`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_core.config import RunConfig, stable_hash
from tracking.retry import RetryPolicy
from tracking.tracker import RunTracker, as_number, tracking_uri

log = logging.getLogger(__name__)

# the flat keys tasks.register.gate_metrics produces
ACCURACY_METRIC = "eval_reward_accuracy"  # held-out preference (implicit reward) accuracy on the main eval set
WIN_RATE_METRIC = "win_rate"  # the judge's policy-vs-reference win rate from the generation comparison
METRIC_TAG_PREFIX = "metric."  # every gate metric is a version tag `metric.<key>`
CANDIDATE, CHAMPION = "candidate", "champion"
LOGGED_MODEL_NAME = "policy"
TASK = "llm/v1/chat"
# Tags written on every version (the gate reads the metrics back from the champion's tags).
TAG_FINGERPRINT, TAG_CONFIG_HASH, TAG_EVAL_SET = "data_fingerprint", "config_hash", "eval_set_id"
TAG_DECISION = "promotion.decision"
INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "Give me one tip for writing clear code."}], "max_tokens": 16}


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


def evaluation_set_id(cfg: RunConfig) -> str:
    """A hash of what defines the main evaluation set and its scoring (held-out sources or the split rule, their
    cap, templating limits, the generation comparison settings and the judge). Versions whose eval sets differ are
    not compared by the gate. (File contents are not read: the data fingerprint covers those.)"""
    data = cfg.data
    held_out = (
        [s.model_dump(mode="json") for s in data.eval]
        if data.eval is not None
        else {"split_of": [s.model_dump(mode="json") for s in data.train], "eval_fraction": data.eval_fraction}
    )
    gen = cfg.eval.model_dump(mode="json", exclude={"batch_size", "generation_batch_size", "bootstrap_samples"})
    return stable_hash({"held_out": held_out, "max_eval_pairs": data.max_eval_pairs,
                        "template": cfg.template.model_dump(mode="json"), "generation": gen,
                        "system_prompt": cfg.model.system_prompt, "chat_template": cfg.model.chat_template})


def promotion_decision(candidate: Mapping[str, float], champion: Mapping[str, float] | None, *, tolerance: float,
                       candidate_eval_set: str, champion_eval_set: str | None, champion_version: str | None,
                       accuracy_key: str = ACCURACY_METRIC, win_rate_key: str = WIN_RATE_METRIC) -> dict[str, Any]:
    """The promotion gate, as a pure function. Returns {'promote': bool, 'reason': str, 'checks': {...}, ...}.

    Promote when there is no champion; otherwise only on the same eval set and when, for accuracy and for win rate,
    candidate >= champion - tolerance. Accuracy must be present on both sides (a champion without it is never
    replaced automatically); a win rate missing on either side is not compared (said in `reason`)."""
    if accuracy_key not in candidate:
        raise ValueError(f"promotion gate: the candidate's metrics lack '{accuracy_key}' (got {sorted(candidate)})")
    decision: dict[str, Any] = {"tolerance": tolerance, "champion_version": champion_version, "checks": {},
                                "eval_set_id": candidate_eval_set}
    if champion is None:
        return {**decision, "promote": True, "reason": "first version: no champion yet"}
    if champion_eval_set is not None and champion_eval_set != candidate_eval_set:
        return {**decision, "promote": False,
                "reason": f"champion v{champion_version} was evaluated on another eval set ({champion_eval_set} != "
                          f"{candidate_eval_set}); not comparable, promote by hand after re-evaluating it"}
    if accuracy_key not in champion:
        return {**decision, "promote": False,
                "reason": f"champion v{champion_version} has no '{accuracy_key}' to compare with; not promoted "
                          "automatically (move the alias by hand if intended)"}
    notes: list[str] = []
    for key in (accuracy_key, win_rate_key):
        if key not in candidate or key not in champion:
            side = "candidate" if key not in candidate else f"champion v{champion_version}"
            notes.append(f"{key} not compared (missing on the {side})")
            continue
        delta = float(candidate[key]) - float(champion[key])
        passed = delta >= -tolerance - 1e-12
        decision["checks"][key] = {"candidate": float(candidate[key]), "champion": float(champion[key]),
                                   "delta": delta, "passed": passed}
        notes.append(f"{key} {candidate[key]:.4f} vs {champion[key]:.4f} (delta {delta:+.4f}, "
                     f"{'ok' if passed else f'worse than -{tolerance}'})")
    promote = all(c["passed"] for c in decision["checks"].values())
    verdict = "promoted" if promote else f"stays candidate, champion remains v{champion_version}"
    return {**decision, "promote": promote, "reason": f"{verdict}: " + "; ".join(notes)}


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


def register_policy(cfg: RunConfig, *, run_id: str, model_dir: Path, metrics: Mapping[str, Any], fingerprint: str,
                    config_hash: str, flow_run_id: str, retry: RetryPolicy | None = None,
                    eval_set_id: str | None = None, accuracy_key: str = ACCURACY_METRIC,
                    win_rate_key: str = WIN_RATE_METRIC, tracker: RunTracker | None = None) -> RegistrationResult:
    """Log + register the policy in `model_dir` under cfg.registry.model_name, then run the promotion gate.

    `metrics`: flat {name: number} (tasks.register.gate_metrics); must hold `accuracy_key` (default
    'eval_reward_accuracy'), should hold `win_rate_key` (default 'win_rate'); all become version tags `metric.<key>`.
    Raises TrackingUnavailable when MLflow stays unreachable, ValueError/FileNotFoundError on bad input."""
    model_dir = Path(model_dir)
    flat = _check_inputs(model_dir, metrics, fingerprint, config_hash, accuracy_key)
    tracker = tracker or RunTracker(cfg, retry=retry, uri=tracking_uri(cfg))
    reg = _Registry(tracker, cfg.registry.model_name)
    eval_set = eval_set_id or evaluation_set_id(cfg)
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
        tags = {TAG_FINGERPRINT: fingerprint, TAG_CONFIG_HASH: config_hash, TAG_EVAL_SET: eval_set,
                "base_model": cfg.model.name_or_path, "flow_run_id": flow_run_id, "loss": cfg.train.objective_name(),
                **{f"{METRIC_TAG_PREFIX}{k}": repr(v) for k, v in flat.items()}}

        def create_version():
            with _mlflow_uris(tracker.uri):  # `models:/m-<id>` sources are resolved through the global URI
                return tracker.client.create_model_version(
                    reg.name, source=info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id,
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
    decision = promotion_decision(
        flat, _version_metrics(champion.tags) if champion is not None else None,
        tolerance=cfg.registry.promotion_tolerance, candidate_eval_set=eval_set,
        champion_eval_set=champion.tags.get(TAG_EVAL_SET) if champion is not None else None,
        champion_version=str(champion.version) if champion is not None else None,
        accuracy_key=accuracy_key, win_rate_key=win_rate_key,
    )
    decision["version"] = version
    current_candidate = reg.by_alias(CANDIDATE) if existing is not None else None
    if current_candidate is None or int(current_candidate.version) <= int(version):  # never move it backwards
        reg.set_alias(CANDIDATE, version)
    if decision["promote"]:
        reg.set_alias(CHAMPION, version)
    champion_version = version if decision["promote"] else decision["champion_version"]
    log.info("registry: %s v%s %s", reg.name, version, decision["reason"])

    tracker.call("log_dict(decision)", lambda: tracker.client.log_dict(run_id, decision,
                                                                          f"registry/decision-v{version}.json"))
    tracker.set_tags(run_id, {"registry.model_name": reg.name, "registry.version": version,
                              "registry.promoted": str(decision["promote"]).lower(),
                              "registry.champion_version": champion_version or "",
                              "registry.reason": decision["reason"][:5000]})
    # the decision tag last: its presence marks a finished registration
    reg.tag_version(version, {"promotion.details": json.dumps(decision, sort_keys=True),
                              TAG_DECISION: "promoted" if decision["promote"] else "candidate"})
    return RegistrationResult(reg.name, version, bool(decision["promote"]), champion_version, decision,
                              f"models:/{reg.name}/{version}", metrics=flat)
