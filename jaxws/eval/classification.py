"""Evaluation: a confusion matrix on the device, DL4J's classification metrics on the host.

The state is fixed-size (``[C, C]`` counts), so updates fuse into the forward pass; the
metrics are read from the counts once, at the end.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from jaxws.errors import EvaluationError
from jaxws.eval.base import Evaluator, flatten_batch

__all__ = ["Evaluation", "EvaluationAveraging", "EvaluationState"]


class EvaluationAveraging(enum.Enum):
    """How per-class metrics are averaged."""

    MACRO = "macro"  # every class counts equally (see Evaluation's zero_division)
    MICRO = "micro"  # every example counts equally


class EvaluationState(NamedTuple):
    confusion: Any  # int32 [C, C]: rows actual, columns predicted
    top_n_correct: Any  # int32 []
    nan_rows: Any  # int32 []: rows with NaN predictions, not counted


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


class Evaluation(Evaluator):
    """Classification metrics, as DL4J's Evaluation.

    Args:
        num_classes: the number of classes (default: the width of the first predictions).
        labels: class names for ``stats()``.
        top_n: also count predictions whose top ``top_n`` classes contain the label.
        binary_decision_threshold: for 2 classes, predict class 1 when its probability is
            at least this (instead of argmax).
        cost_array: per-class weights; the predicted class is ``argmax(p * cost)``.
        zero_division: how a class whose metric is 0/0 (never predicted, for precision)
            enters a macro average: ``"zero"`` (default, scikit-learn's convention: it
            counts as 0, over the classes that occur as labels or predictions) or
            ``"exclude"`` (DL4J's: it is left out of the average).

    Example:
        >>> import numpy as np
        >>> from jaxws.eval import Evaluation
        >>> ev = Evaluation()
        >>> ev.eval(np.array([0, 1, 2, 2]), np.eye(3)[[0, 1, 1, 2]])
        >>> ev.accuracy(), ev.confusion_matrix()[2].tolist()
        (0.75, [0, 1, 1])
    """

    def __init__(
        self,
        num_classes: int | None = None,
        *,
        labels: Sequence[str] | None = None,
        top_n: int = 1,
        binary_decision_threshold: float | None = None,
        cost_array: Sequence[float] | None = None,
        zero_division: str = "zero",
    ):
        super().__init__()
        if zero_division not in ("zero", "exclude"):
            raise EvaluationError(
                f"Evaluation(zero_division={zero_division!r}): expected 'zero' (scikit-learn's "
                "convention: 0/0 counts as 0) or 'exclude' (DL4J's: 0/0 classes are left out)."
            )
        self.zero_division = zero_division
        if labels is not None:
            labels = [str(x) for x in labels]
            if num_classes is not None and len(labels) != num_classes:
                raise EvaluationError(f"Evaluation: {len(labels)} labels for num_classes={num_classes}.")
            num_classes = len(labels)
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2):
            raise EvaluationError(f"Evaluation(num_classes={num_classes!r}): expected an int >= 2.")
        if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
            raise EvaluationError(f"Evaluation(top_n={top_n!r}): expected an int >= 1.")
        if binary_decision_threshold is not None and not 0.0 <= binary_decision_threshold <= 1.0:
            raise EvaluationError(f"Evaluation(binary_decision_threshold={binary_decision_threshold!r}): expected 0..1.")
        self.num_classes = num_classes
        self.label_names = labels
        self.top_n = top_n
        self.binary_decision_threshold = binary_decision_threshold
        self.cost_array = None if cost_array is None else [float(c) for c in cost_array]
        self._check_config()

    def _check_config(self) -> None:
        n = self.num_classes
        if n is None:
            return
        if self.binary_decision_threshold is not None and n != 2:
            raise EvaluationError(f"Evaluation: binary_decision_threshold needs 2 classes, not {n}.")
        if self.cost_array is not None and len(self.cost_array) != n:
            raise EvaluationError(f"Evaluation: cost_array has {len(self.cost_array)} entries for {n} classes.")

    def _config(self) -> dict:
        return {"num_classes": self.num_classes, "labels": self.label_names, "top_n": self.top_n,
                "binary_decision_threshold": self.binary_decision_threshold, "cost_array": self.cost_array,
                "zero_division": self.zero_division}

    def _static_key(self) -> tuple:
        return (type(self), self.num_classes, self.top_n, self.binary_decision_threshold,
                None if self.cost_array is None else tuple(self.cost_array))

    def _init_key(self) -> tuple:
        return self._static_key()  # every setting the state's shapes follow

    def _configure(self, num_outputs: int) -> None:
        if self.num_classes is None:
            self.num_classes = max(2, num_outputs)
            self._check_config()

    # -- functional core -------------------------------------------------------------------

    def init(self) -> EvaluationState:
        if self.num_classes is None:
            raise EvaluationError("Evaluation.init(): num_classes is unknown; pass it, or eval() data first.")
        n = self.num_classes
        return EvaluationState(jnp.zeros((n, n), jnp.int32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def update(self, state: EvaluationState, labels, predictions, mask=None) -> EvaluationState:
        labels, p, w, sparse = flatten_batch(labels, predictions, mask, who="Evaluation")
        n = self.num_classes
        if p.shape[-1] == 1 and n == 2:  # one sigmoid column: P(class 1)
            p = jnp.concatenate([1 - p, p], axis=-1)
            labels = labels if sparse else labels[:, 0].astype(jnp.int32)
            sparse = True
        if p.shape[-1] != n:
            raise EvaluationError(
                f"Evaluation: predictions have {p.shape[-1]} classes, the evaluation {n} "
                f"(num_classes={n}). Use Evaluation(num_classes={p.shape[-1]})."
            )
        actual = labels.astype(jnp.int32) if sparse else jnp.argmax(labels, axis=-1)
        nan = jnp.any(jnp.isnan(p), axis=-1)
        counted = (w > 0) & ~nan
        if self.binary_decision_threshold is not None:
            predicted = (p[:, 1] >= self.binary_decision_threshold).astype(jnp.int32)
        elif self.cost_array is not None:
            predicted = jnp.argmax(p * jnp.asarray(self.cost_array, p.dtype), axis=-1)
        else:
            predicted = jnp.argmax(p, axis=-1)
        confusion = state.confusion.at[actual, predicted].add(counted.astype(jnp.int32))
        p_actual = jnp.take_along_axis(p, jnp.clip(actual, 0, n - 1)[:, None], axis=-1)
        in_top = jnp.sum(p > p_actual, axis=-1) < self.top_n
        return EvaluationState(
            confusion,
            state.top_n_correct + jnp.sum(in_top & counted).astype(jnp.int32),
            state.nan_rows + jnp.sum(nan & (w > 0)).astype(jnp.int32),
        )

    def merge_states(self, a: EvaluationState, b: EvaluationState) -> EvaluationState:
        return EvaluationState(*(x + y for x, y in zip(a, b)))

    def compute(self, state: EvaluationState) -> dict:
        cm, top_n_correct, nan_rows = (np.asarray(x, np.int64) for x in state)  # int(device scalar): 13 us, this 3
        total = cm.sum()
        tp = np.diag(cm)
        fp = cm.sum(axis=0) - tp
        fn = cm.sum(axis=1) - tp
        return {"confusion": cm, "total": int(total), "tp": tp, "fp": fp, "fn": fn,
                "tn": total - tp - fp - fn, "top_n_correct": int(top_n_correct),
                "nan_rows": int(nan_rows)}

    # -- metrics ---------------------------------------------------------------------------

    def _counts(self) -> dict:
        counts = self._require()
        if counts["total"] == 0:
            raise EvaluationError("Evaluation: no examples were counted (all masked out or NaN).")
        return counts

    def confusion_matrix(self) -> np.ndarray:
        """Counts as numpy, rows the actual class, columns the predicted one."""
        return self._require()["confusion"]

    def accuracy(self) -> float:
        c = self._counts()
        return float(c["tp"].sum() / c["total"])

    def top_n_accuracy(self) -> float:
        c = self._counts()
        return float(c["top_n_correct"] / c["total"])

    def _metric(self, per_class: np.ndarray, micro: float, cls: int | None, averaging) -> float:
        if cls is not None:
            if not 0 <= cls < len(per_class):
                raise EvaluationError(f"cls={cls} is not a class (0..{len(per_class) - 1}).")
            value = per_class[cls]
            return 0.0 if np.isnan(value) else float(value)
        if EvaluationAveraging(averaging) is EvaluationAveraging.MICRO:
            return 0.0 if np.isnan(micro) else float(micro)
        if self.zero_division == "exclude":  # DL4J: 0/0 classes are left out
            defined = per_class[~np.isnan(per_class)]
        else:  # scikit-learn: 0/0 is 0, over the classes that occur
            defined = np.nan_to_num(per_class[self._occurring()], nan=0.0)
        return float(defined.mean()) if defined.size else 0.0

    def _occurring(self) -> np.ndarray:
        """Classes that occur as an actual label or a prediction (scikit-learn's labels)."""
        cm = self._counts()["confusion"]
        return (cm.sum(axis=0) + cm.sum(axis=1)) > 0

    def excluded_classes(self, metric: str = "precision") -> int:
        """Classes left out of a macro average (``zero_division="exclude"``: those with 0/0
        ``metric``; ``"zero"``: those that never occur)."""
        if self.zero_division == "exclude":
            return int(np.isnan(self._per_class(metric)).sum())
        return int((~self._occurring()).sum())

    def _per_class(self, metric: str, beta: float = 1.0) -> np.ndarray:
        c = self._counts()
        return _binary_metric(metric, *(c[k].astype(np.float64) for k in ("tp", "fp", "fn", "tn")), beta)

    def _micro(self, metric: str, beta: float = 1.0) -> float:
        c = self._counts()
        counts = (np.array([c[k].sum()], np.float64) for k in ("tp", "fp", "fn", "tn"))
        return float(_binary_metric(metric, *counts, beta)[0])

    def precision(self, cls: int | None = None, averaging=EvaluationAveraging.MACRO) -> float:
        """Precision of class ``cls``, or averaged (0/0 classes: see ``zero_division``)."""
        return self._metric(self._per_class("precision"), self._micro("precision"), cls, averaging)

    def recall(self, cls: int | None = None, averaging=EvaluationAveraging.MACRO) -> float:
        return self._metric(self._per_class("recall"), self._micro("recall"), cls, averaging)

    def f_beta(self, beta: float, cls: int | None = None, averaging=EvaluationAveraging.MACRO) -> float:
        return self._metric(self._per_class("fbeta", beta), self._micro("fbeta", beta), cls, averaging)

    def f1(self, cls: int | None = None, averaging=EvaluationAveraging.MACRO) -> float:
        return self.f_beta(1.0, cls, averaging)

    def g_measure(self, cls: int | None = None, averaging=EvaluationAveraging.MACRO) -> float:
        return self._metric(self._per_class("gmeasure"), self._micro("gmeasure"), cls, averaging)

    def false_positive_rate(self, cls: int | None = None, averaging=EvaluationAveraging.MACRO) -> float:
        return self._metric(self._per_class("fpr"), self._micro("fpr"), cls, averaging)

    def false_negative_rate(self, cls: int | None = None, averaging=EvaluationAveraging.MACRO) -> float:
        return self._metric(self._per_class("fnr"), self._micro("fnr"), cls, averaging)

    def matthews_correlation(self, cls: int | None = None, averaging=None) -> float:
        """MCC: of class ``cls`` (one vs rest), averaged, or (default) the multiclass MCC.

        The default is the multiclass generalisation (Gorodkin's R_K, as scikit-learn's
        ``matthews_corrcoef``); for 2 classes it equals the MCC of class 1.
        """
        if cls is not None or averaging is not None:
            return self._metric(self._per_class("mcc"), self._micro("mcc"), cls, averaging or EvaluationAveraging.MACRO)
        cm = self._counts()["confusion"].astype(np.float64)
        t, p, n = cm.sum(axis=1), cm.sum(axis=0), cm.sum()
        cov_tp = np.trace(cm) * n - t @ p
        den = np.sqrt((n * n - p @ p) * (n * n - t @ t))
        return float(cov_tp / den) if den > 0 else 0.0

    # -- report ----------------------------------------------------------------------------

    def _name(self, i: int) -> str:
        return self.label_names[i] if self.label_names else str(i)

    def stats(self) -> str:
        """DL4J's report: metrics, then the confusion matrix (up to 20 classes)."""
        if self.state is None:
            return "Evaluation: no data yet (call eval() or net.do_evaluation() first)."
        c = self.compute(self.state)
        n = self.num_classes
        lines = ["", "========================Evaluation Metrics========================",
                 f" # of classes:    {n}"]
        if c["total"] == 0:
            lines.append(" no examples counted (all masked out or NaN)")
        else:
            binary = n == 2
            cls = 1 if binary else None
            lines += [f" Accuracy:        {self.accuracy():.4f}",
                      f" Precision:       {self.precision(cls):.4f}",
                      f" Recall:          {self.recall(cls):.4f}",
                      f" F1 Score:        {self.f1(cls):.4f}"]
            if self.top_n > 1:
                lines.append(f" Top {self.top_n} Accuracy:  {self.top_n_accuracy():.4f}")
            if binary:
                lines.append(f'Precision, recall & F1: reported for positive class (class 1 - "{self._name(1)}") only')
            else:
                excluded = self.excluded_classes("precision")
                why = "with 0/0 precision" if self.zero_division == "exclude" else "that never occur"
                note = f"; {excluded} class(es) {why} excluded" if excluded else ""
                lines.append(f"Precision, recall & F1: macro-averaged (equally weighted avg. of {n} classes{note})")
        if c["nan_rows"]:
            lines.append(f"WARNING: {c['nan_rows']} example(s) had NaN predictions and were not counted.")
        lines += ["", "", "=========================Confusion Matrix========================="]
        if n > 20:
            lines.append(f"(not shown for {n} classes > 20: use confusion_matrix())")
        else:
            cm = c["confusion"]
            width = max(3, len(str(cm.max())) + 1)
            lines.append("".join(f"{i:>{width}}" for i in range(n)))
            lines.append("-" * (width * n))
            for i in range(n):
                lines.append("".join(f"{v:>{width}}" for v in cm[i]) + f" | {i} = {self._name(i)}")
            lines += ["", "Confusion matrix format: Actual (rowClass) predicted as (columnClass) N times"]
        lines.append("==================================================================")
        return "\n".join(lines)


def _binary_metric(metric: str, tp, fp, fn, tn, beta: float = 1.0) -> np.ndarray:
    """One-vs-rest metrics from counts (arrays); NaN where the metric is 0/0."""
    if metric == "precision":
        return _ratio(tp, tp + fp)
    if metric == "recall":
        return _ratio(tp, tp + fn)
    if metric == "fbeta":
        b2 = beta * beta
        return _ratio((1 + b2) * tp, (1 + b2) * tp + b2 * fn + fp)
    if metric == "gmeasure":
        return np.sqrt(_ratio(tp, tp + fp) * _ratio(tp, tp + fn))
    if metric == "fpr":
        return _ratio(fp, fp + tn)
    if metric == "fnr":
        return _ratio(fn, fn + tp)
    if metric == "mcc":
        return _ratio(tp * tn - fp * fn, np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    raise AssertionError(metric)
