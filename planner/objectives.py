"""What a fidelity run and a final report score: a named objective (``fidelity.objective``).

Each objective says its direction and how to score a trained in-memory PEFT model; the search only ever
sees ``search_score`` (lower is better: a higher-is-better value is negated), so it never knows which one
runs. ``eval_loss`` (the default) is the held-out loss the trainer already computes; ``lm_eval`` runs an
lm-evaluation-harness task offline (``planner.fidelity.harness``). Only a non-default objective adds an
entry to the recipe key, so every stored ``eval_loss`` score keeps its key and none is reused for another.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, Literal

from planner.config import QRAConfig

if TYPE_CHECKING:  # contract imports this module for the recipe
    from planner.fidelity.contract import EvalResult

Direction = Literal["minimize", "maximize"]


@dataclass(frozen=True)
class Objective:
    """A named score of a trained model. ``label`` names it in logs and reports (``eval loss``, ``task acc``)."""

    name: str
    direction: Direction
    label: str

    def value(self, result: EvalResult) -> float | None:
        """The objective as measured (loss, accuracy) in an ok result; None when it has none."""
        raise NotImplementedError

    def search_score(self, result: EvalResult) -> float | None:
        """What the search minimises: the value, negated when higher is better."""
        if result.status != "ok" or (value := self.value(result)) is None:
            return None
        return value if self.direction == "minimize" else -value

    def shown(self, score: float) -> float:
        """A search score back in the objective's own units (for logs and reports)."""
        return score if self.direction == "minimize" else -score

    def measure(self, model: Any, tokenizer: Any, config: QRAConfig) -> float | None:
        """Score the trained model after the run's own eval loss; None: the result's eval loss is the value."""
        return None

    def recipe(self, config: QRAConfig) -> dict[str, Any] | None:
        """What the objective adds to the recipe key (None: nothing, so today's keys stay as they are)."""
        return None


class EvalLoss(Objective):
    def value(self, result: EvalResult) -> float | None:
        return result.eval_loss


class LMEval(Objective):
    def value(self, result: EvalResult) -> float | None:
        return result.objective_value

    def measure(self, model: Any, tokenizer: Any, config: QRAConfig) -> float | None:
        from planner.fidelity.harness import run_task  # imports lm_eval only where the objective runs

        return run_task(model, tokenizer, config.fidelity.lm_eval, config.data.eval_split)

    def recipe(self, config: QRAConfig) -> dict[str, Any] | None:
        from planner.fidelity.harness import task_identity

        section = config.fidelity.lm_eval
        return {
            "name": self.name,
            "lm_eval": section.model_dump(mode="json"),
            "task_files": task_identity(section),
            "lm_eval_version": _version("lm_eval"),
        }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


#: the registry: ``fidelity.objective`` names one of these
OBJECTIVES: dict[str, Objective] = {
    "eval_loss": EvalLoss("eval_loss", "minimize", "eval loss"),
    "lm_eval": LMEval("lm_eval", "maximize", "lm-eval"),
}


def objective_for(config: QRAConfig) -> Objective:
    """The objective a config scores with; an lm-eval one is labelled with its task and metric."""
    objective = OBJECTIVES[config.fidelity.objective]
    if isinstance(objective, LMEval):
        section = config.fidelity.lm_eval
        return LMEval(objective.name, objective.direction, f"{section.task} {section.metric}")
    return objective


def describe(config: QRAConfig) -> str:
    """What a search score is, for plans and reports (the eval-loss wording predates the hook and stays)."""
    objective = objective_for(config)
    if objective.direction == "minimize":
        return f"high-fidelity held-out {objective.label}"
    return f"minus the high-fidelity lm-eval {objective.label}"
