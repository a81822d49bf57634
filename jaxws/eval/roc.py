"""ROC, ROCMultiClass, ROCBinary: thresholded counts or exact scores, kept on the device.

``threshold_steps > 0`` keeps histogram counts at evenly spaced thresholds (constant
memory); ``0`` keeps every score in a device buffer that grows in blocks (REALLOCATE, no
per-batch host copy) and gives the exact curves.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxws.configuration import SpillPolicy, WorkspaceConfiguration
from jaxws.errors import EvaluationError
from jaxws.eval.base import Evaluator, flatten_batch

__all__ = ["ROC", "ROCMultiClass", "ROCBinary", "RocCurve", "PrecisionRecallCurve", "ThresholdState", "ExactState"]

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 names it trapz
_BLOCK = 4096
_GROWTH = WorkspaceConfiguration(policy_spill=SpillPolicy.REALLOCATE, overallocation_limit=1.0)


class RocCurve(NamedTuple):
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


class PrecisionRecallCurve(NamedTuple):
    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray


class ThresholdState(NamedTuple):
    positives: Any  # f32 [K, S + 1]: weighted positives whose score falls in bin i
    negatives: Any  # f32 [K, S + 1]


class ExactState(NamedTuple):
    scores: Any  # f32 [capacity, K]
    positive: Any  # f32 [capacity, K] (1 = positive)
    weights: Any  # f32 [capacity, K] (0 = masked or unused)
    count: Any  # int32 []: rows written


def _curves(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray):
    """Exact ``(tps, fps, thresholds)`` at each distinct score, descending (as scikit-learn)."""
    keep = weights > 0
    scores, positive, weights = scores[keep], positive[keep], weights[keep]
    order = np.argsort(-scores, kind="mergesort")
    scores, positive, weights = scores[order], positive[order], weights[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(positive * weights)[last]
    fps = np.cumsum((1 - positive) * weights)[last]
    return tps, fps, scores[last]


class _ROCFamily(Evaluator):
    def __init__(self, threshold_steps: int = 0, *, auprc: str = "average_precision"):
        super().__init__()
        if isinstance(threshold_steps, bool) or not isinstance(threshold_steps, int) or threshold_steps < 0:
            raise EvaluationError(
                f"{type(self).__name__}(threshold_steps={threshold_steps!r}): expected an int >= 0 "
                "(0 = exact)."
            )
        if auprc not in ("average_precision", "trapezoid"):
            raise EvaluationError(
                f"{type(self).__name__}(auprc={auprc!r}): expected 'average_precision' (default, "
                "scikit-learn's average_precision_score) or 'trapezoid' (DL4J's area)."
            )
        self.threshold_steps = threshold_steps
        self.auprc = auprc
        self.num_outputs: int | None = None
        self._filled = 0  # rows reserved in the exact buffer (known on the host, no sync)
        self.reallocations = 0

    @property
    def exact(self) -> bool:
        return self.threshold_steps == 0

    def _static_key(self) -> tuple:
        return (type(self), self.threshold_steps, self.num_outputs)

    def _init_key(self) -> tuple:
        return self._static_key()  # every setting the state's shapes follow

    @property
    def _grows(self) -> bool:  # exact: _reserve grows the buffers as rows come
        return self.exact

    def _config(self) -> dict:
        return {"threshold_steps": self.threshold_steps, "auprc": self.auprc}

    @abc.abstractmethod
    def _extract(self, labels, predictions, mask):
        """``(scores [M, K], positive [M, K], weights [M, K])``."""

    # -- functional core -------------------------------------------------------------------

    def init(self):
        k = self.num_outputs or 1
        if self.exact:  # distinct buffers: the state is donated leaf by leaf
            return ExactState(*(jnp.zeros((_BLOCK, k), jnp.float32) for _ in range(3)), jnp.zeros((), jnp.int32))
        return ThresholdState(*(jnp.zeros((k, self.threshold_steps + 1), jnp.float32) for _ in range(2)))

    def update(self, state, labels, predictions, mask=None):
        scores, positive, weights = self._extract(labels, predictions, mask)
        if scores.shape[1] != (self.num_outputs or 1):
            raise EvaluationError(
                f"{type(self).__name__}: predictions give {scores.shape[1]} curves, the evaluator "
                f"was sized for {self.num_outputs}."
            )
        nan = jnp.isnan(scores)
        weights = jnp.where(nan, 0.0, weights)
        scores = jnp.where(nan, 0.0, scores)
        if self.exact:
            at = (state.count, 0)
            return ExactState(
                jax.lax.dynamic_update_slice(state.scores, scores, at),
                jax.lax.dynamic_update_slice(state.positive, positive, at),
                jax.lax.dynamic_update_slice(state.weights, weights, at),
                state.count + scores.shape[0],
            )
        steps = self.threshold_steps
        bins = jnp.clip(jnp.floor(scores * steps), 0, steps).astype(jnp.int32)
        rows = jnp.broadcast_to(jnp.arange(scores.shape[1]), bins.shape)
        return ThresholdState(
            state.positives.at[rows, bins].add(weights * positive),
            state.negatives.at[rows, bins].add(weights * (1 - positive)),
        )

    def _reserve(self, state, rows: int):
        if not self.exact:
            return state
        need = self._filled + rows
        self._filled = need
        capacity = state.scores.shape[0]
        if need <= capacity:
            return state
        grown = max(_GROWTH.allocate(capacity), -(-need // _BLOCK) * _BLOCK)
        self.reallocations += 1
        pad = ((0, grown - capacity), (0, 0))
        return ExactState(jnp.pad(state.scores, pad), jnp.pad(state.positive, pad), jnp.pad(state.weights, pad), state.count)

    def merge_states(self, a, b):
        if not self.exact:
            return ThresholdState(a.positives + b.positives, a.negatives + b.negatives)
        na, nb = int(np.asarray(a.count)), int(np.asarray(b.count))
        return ExactState(*(jnp.concatenate([x[:na], y[:nb]]) for x, y in zip(a[:3], b[:3])),
                          jnp.asarray(na + nb, jnp.int32))

    def reset(self) -> None:
        super().reset()
        self._filled = 0

    def compute(self, state) -> dict:
        """``(tps, fps, thresholds)`` per output, thresholds descending; one host read."""
        k = self.num_outputs or 1
        if self.exact:
            n = int(np.asarray(state.count))  # int() of a device scalar takes 4x as long
            s, p, w = (np.asarray(x, np.float64)[:n] for x in state[:3])
            return {"curves": [_curves(s[:, i], p[:, i], w[:, i]) for i in range(k)]}
        pos = np.asarray(state.positives, np.float64)[:, ::-1].cumsum(axis=1)
        neg = np.asarray(state.negatives, np.float64)[:, ::-1].cumsum(axis=1)
        thresholds = np.arange(self.threshold_steps, -1, -1) / self.threshold_steps
        return {"curves": [(pos[i], neg[i], thresholds) for i in range(k)]}

    def _load(self, state: Any) -> None:
        if isinstance(state, ExactState):
            self._filled = int(np.asarray(state.count))

    # -- results ---------------------------------------------------------------------------

    def _tps_fps(self, k: int):
        results = self._require()["curves"]
        if not 0 <= k < len(results):
            raise EvaluationError(f"{type(self).__name__}: output {k} does not exist (0..{len(results) - 1}).")
        tps, fps, thresholds = results[k]
        if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
            raise EvaluationError(
                f"{type(self).__name__}: output {k} needs both positive and negative examples for a "
                f"ROC curve (positives {tps[-1] if tps.size else 0:g}, negatives {fps[-1] if fps.size else 0:g})."
            )
        return tps, fps, thresholds

    def _roc(self, k: int) -> RocCurve:
        tps, fps, thresholds = self._tps_fps(k)
        return RocCurve(np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]], np.r_[np.inf, thresholds])

    def _pr(self, k: int) -> PrecisionRecallCurve:
        tps, fps, thresholds = self._tps_fps(k)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(tps + fps > 0, tps / np.maximum(tps + fps, 1e-300), 1.0)
        recall = tps / tps[-1]
        # from recall 0 (precision 1) upwards, as scikit-learn reports it reversed
        return PrecisionRecallCurve(np.r_[1.0, precision], np.r_[0.0, recall], np.r_[np.inf, thresholds])

    def _auc(self, k: int) -> float:
        roc = self._roc(k)
        return float(_trapezoid(roc.tpr, roc.fpr))

    def _auprc(self, k: int) -> float:
        pr = self._pr(k)
        if self.auprc == "trapezoid":  # DL4J: the area under the interpolated curve
            return float(_trapezoid(pr.precision, pr.recall))
        # average precision: each recall step weighted by the precision reached there
        return float(np.sum(np.diff(pr.recall) * pr.precision[1:]))

    def stats(self) -> str:
        if self.state is None:
            return f"{type(self).__name__}: no data yet (call eval() or net.do_evaluation() first)."
        mode = "exact" if self.exact else f"{self.threshold_steps} threshold steps"
        lines = [f"{type(self).__name__} ({mode})"]
        for k in range(self.num_outputs or 1):
            try:
                lines.append(f"  {k}: AUC (ROC) {self._auc(k):.4f}   AUPRC {self._auprc(k):.4f}")
            except EvaluationError as e:
                lines.append(f"  {k}: {e}")
        return "\n".join(lines)


class ROC(_ROCFamily):
    """Binary ROC: scores of one sigmoid column or column 1 of a 2-class softmax.

    Example:
        >>> import numpy as np
        >>> from jaxws.eval import ROC
        >>> roc = ROC()
        >>> roc.eval(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
        >>> roc.calculate_auc()
        0.75
    """

    def _configure(self, num_outputs: int) -> None:
        if num_outputs > 2:
            raise EvaluationError(f"ROC is binary; predictions have {num_outputs} columns: use ROCMultiClass.")
        self.num_outputs = 1

    def _extract(self, labels, predictions, mask):
        predictions = jnp.asarray(predictions)
        if predictions.ndim >= 1 and predictions.shape[-1] > 2 and predictions.ndim > 1:
            raise EvaluationError(f"ROC is binary; predictions have {predictions.shape[-1]} columns: use ROCMultiClass.")
        labels_, p, w, sparse = flatten_batch(labels, predictions, mask, who="ROC")
        score = p[:, -1:]
        positive = (labels_[:, None] == 1) if sparse else (labels_[:, -1:] > 0.5)
        return score, positive.astype(jnp.float32), w[:, None]

    def calculate_auc(self) -> float:
        """Area under the ROC curve (exact mode: equal to scikit-learn's roc_auc_score)."""
        return self._auc(0)

    def calculate_auprc(self) -> float:
        """Area under the precision-recall curve: average precision (scikit-learn's
        ``average_precision_score``) by default, the trapezoid area with ``auprc="trapezoid"``."""
        return self._auprc(0)

    def get_roc_curve(self) -> RocCurve:
        return self._roc(0)

    def get_precision_recall_curve(self) -> PrecisionRecallCurve:
        return self._pr(0)


class ROCMultiClass(_ROCFamily):
    """One-vs-all ROC per class of a softmax output."""

    def _configure(self, num_outputs: int) -> None:
        if self.num_outputs is None:
            self.num_outputs = num_outputs

    def _config(self) -> dict:
        return {**super()._config(), "num_classes": self.num_outputs}

    def __init__(self, threshold_steps: int = 0, num_classes: int | None = None, *, auprc: str = "average_precision"):
        super().__init__(threshold_steps, auprc=auprc)
        self.num_outputs = num_classes

    def _extract(self, labels, predictions, mask):
        labels_, p, w, sparse = flatten_batch(labels, predictions, mask, who="ROCMultiClass")
        if sparse:
            positive = labels_[:, None] == jnp.arange(p.shape[1])
        else:
            positive = labels_ > 0.5
        return p, positive.astype(jnp.float32), jnp.broadcast_to(w[:, None], p.shape)

    def calculate_auc(self, cls: int) -> float:
        return self._auc(cls)

    def calculate_auprc(self, cls: int) -> float:
        return self._auprc(cls)

    def calculate_average_auc(self) -> float:
        return float(np.mean([self._auc(k) for k in range(self.num_outputs)]))

    def calculate_average_auprc(self) -> float:
        return float(np.mean([self._auprc(k) for k in range(self.num_outputs)]))

    def get_roc_curve(self, cls: int) -> RocCurve:
        return self._roc(cls)

    def get_precision_recall_curve(self, cls: int) -> PrecisionRecallCurve:
        return self._pr(cls)


class ROCBinary(ROCMultiClass):
    """Independent ROC curves for each sigmoid output (multi-label), with per-output masks."""

    def _extract(self, labels, predictions, mask):
        predictions = jnp.asarray(predictions)
        per_output = None if mask is None else jnp.asarray(mask)
        if per_output is not None and per_output.shape == predictions.shape:
            mask = None
        labels_, p, w, _ = flatten_batch(labels, predictions, mask, who="ROCBinary", sparse_ok=False)
        weights = jnp.broadcast_to(w[:, None], p.shape)
        if per_output is not None and per_output.shape == predictions.shape:
            weights = per_output.reshape(p.shape).astype(jnp.float32)
        return p, (labels_ > 0.5).astype(jnp.float32), weights
