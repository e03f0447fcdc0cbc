"""Fidelity: score a plan with a real short SFT run. ``contract`` says what an evaluation is and when a
stored one may be reused; ``sft`` runs it; ``meter`` measures its memory; ``worker`` serves it in a child."""

from planner.fidelity.contract import EvalKey, EvalResult, EvalTask, one_line

__all__ = ["EvalKey", "EvalResult", "EvalTask", "one_line"]
