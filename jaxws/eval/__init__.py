"""Evaluation without host round-trips: fixed-size device states, metrics read once."""

from jaxws.eval.base import Evaluator
from jaxws.eval.binary import EvaluationBinary
from jaxws.eval.classification import Evaluation
from jaxws.eval.classification import EvaluationAveraging
from jaxws.eval.regression import RegressionEvaluation
from jaxws.eval.roc import ROC
from jaxws.eval.roc import PrecisionRecallCurve
from jaxws.eval.roc import ROCBinary
from jaxws.eval.roc import ROCMultiClass
from jaxws.eval.roc import RocCurve

__all__ = [
    "Evaluation",
    "EvaluationAveraging",
    "EvaluationBinary",
    "Evaluator",
    "PrecisionRecallCurve",
    "ROC",
    "ROCBinary",
    "ROCMultiClass",
    "RegressionEvaluation",
    "RocCurve",
]
