"""Evaluation: faithfulness, KL divergence, faithfulness curves (CPR/CMD), AUROC vs a reference."""

from circuitfind.evaluation.faithfulness import (
    DEFAULT_FRACTIONS,
    FaithfulnessCurve,
    FaithfulnessReport,
    evaluate,
    faithfulness_curve,
    normalized_faithfulness,
)

__all__ = ["DEFAULT_FRACTIONS", "FaithfulnessCurve", "FaithfulnessReport", "evaluate",
           "faithfulness_curve", "normalized_faithfulness"]
