"""The select stage: the winner's bundle, from the best trial's checkpoint; with
`sweep.ensemble` above 1, from the trials chosen on the validation split to answer together
(models/ensemble.py), when the mean of the best few scores better than the best alone.

Candidates are the `sweep.ensemble` best trials by the sweep metric, each at its best
checkpoint; they are scored on the validation rows the trials were scored on (the first
train.eval_batches batches).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from orchestrator.models.ensemble import LOG_FLOOR, Ensemble, choose_members
from orchestrator.records import BundleRef, DataInfo, EnsembleMember
from orchestrator.rundir import RunDir
from orchestrator.spec import JobSpec
from orchestrator.sweep.space import apply_trial_config
from orchestrator.sweep.tuner import Winner, winner_of_row
from orchestrator.train.objectives import classification_metrics, evaluate
from orchestrator.train.session import first_batches, read_split_tensors
from orchestrator.weights.model import save_bundle, save_ensemble_bundle, trained_model


def select_winner(spec: JobSpec, run_dir: RunDir, info: DataInfo, trials: pd.DataFrame,
                  winner: Winner, note: Callable[[str], None]) -> BundleRef:
    """The bundle at run_dir/winner: of the ensemble chosen, or of `winner` alone."""
    if spec.sweep.ensemble > 1:
        bundle = _ensemble(spec, run_dir, info, trials, note)
        if bundle is not None:
            return bundle
    return save_bundle(run_dir.winner, apply_trial_config(spec, winner.config), info,
                       winner.checkpoint, run_dir.tokenizer, {"val": winner.val_metrics},
                       winner.trial_id, base=run_dir.base)


def _ensemble(spec: JobSpec, run_dir: RunDir, info: DataInfo, trials: pd.DataFrame,
              note: Callable[[str], None]) -> BundleRef | None:
    """The ensemble bundle of the chosen trials; None when the best answers best alone."""
    candidates = _candidates(trials, spec, spec.sweep.ensemble)
    batch_size, count = spec.train.batch_size, spec.train.eval_batches
    batches = first_batches(read_split_tensors(run_dir, "val", first=batch_size * count),
                            batch_size, count, torch.device("cpu"))
    labels = torch.cat([batch["label"] for batch in batches]).numpy()
    specs = [apply_trial_config(spec, c.config) for c in candidates]
    models = [trained_model(s, info, c.checkpoint, base=run_dir.base).eval()
              for s, c in zip(specs, candidates)]
    probabilities = [class_probabilities(model, batches) for model in models]
    chosen = choose_members(probabilities, metric_scorer(spec.metric, labels, info.num_classes),
                            spec.sweep.ensemble)
    if len(chosen) == 1:
        note(f"sweep.ensemble {spec.sweep.ensemble}: the mean of the {len(candidates)} best "
             f"trials scores no better {spec.metric} than {candidates[chosen[0]].trial_id}, "
             "which answers alone")
        return None
    members = [candidates[i] for i in chosen]
    ensemble = Ensemble([models[i] for i in chosen])
    val_metrics = {f"val_{k}": v for k, v in evaluate(ensemble, batches, info.task,
                                                      info.num_classes).items()}
    bundle = save_ensemble_bundle(
        run_dir.winner, specs[chosen[0]], info,
        [(EnsembleMember(candidates[i].trial_id, candidates[i].config,
                         specs[i].model.model_dump(mode="json"), candidates[i].metric), models[i])
         for i in chosen],
        run_dir.tokenizer, {"val": val_metrics})
    note(f"ensemble of {len(members)} trials ({', '.join(m.trial_id for m in members)}): "
         f"{spec.metric} {val_metrics[spec.metric]:.4f} against {members[0].metric:.4f} for "
         f"{members[0].trial_id} alone")
    return bundle


def _candidates(trials: pd.DataFrame, spec: JobSpec, limit: int) -> list[Winner]:
    """The best `limit` trials that reported the metric and kept a checkpoint, best first."""
    column = f"best_{spec.metric}"
    if column not in trials:
        return []
    ranked = trials.dropna(subset=[column, "checkpoint_path"]).sort_values(
        column, ascending=spec.metric_mode == "min", kind="stable")
    return [winner_of_row(row, spec) for _, row in ranked.head(limit).iterrows()]


@torch.no_grad()
def class_probabilities(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([model(batch["ids"].long()).float().softmax(-1) for batch in batches])


def metric_scorer(metric: str, labels: np.ndarray, num_classes: int
                  ) -> Callable[[torch.Tensor], float]:
    """Rates class probabilities by the sweep metric, higher better (val_loss negated)."""
    def score(probabilities: torch.Tensor) -> float:
        if metric == "val_loss":
            known = torch.from_numpy(labels) >= 0
            picked = probabilities[known, torch.from_numpy(labels)[known]]
            return float(picked.clamp(min=LOG_FLOOR).log().mean())
        predictions = probabilities.argmax(-1).numpy()
        return classification_metrics(predictions, labels, num_classes)[metric.removeprefix("val_")]
    return score
