"""Evaluation: faithfulness, KL divergence, faithfulness curves (CPR/CMD), AUROC vs a reference."""

from circuitfind.evaluation.faithfulness import (
    CONVENTIONS,
    DEFAULT_FRACTIONS,
    FaithfulnessCurve,
    FaithfulnessReport,
    evaluate,
    faithfulness_curve,
    normalized_faithfulness,
)
from circuitfind.evaluation.roc import (
    RocResult,
    circuit_confusion,
    edge_roc,
    node_roc,
    sweep_auc,
)

__all__ = ["CONVENTIONS", "DEFAULT_FRACTIONS", "FaithfulnessCurve", "FaithfulnessReport", "evaluate",
           "faithfulness_curve", "normalized_faithfulness", "RocResult", "circuit_confusion",
           "edge_roc", "node_roc", "sweep_auc"]
