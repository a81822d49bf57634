"""EvaluationBinary: per-output confusion counts of independent binary (sigmoid) outputs.

Four ``[K]`` counters on the device; an optional decision threshold per output.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from jaxws.errors import EvaluationError
from jaxws.eval.base import Evaluator, flatten_batch
from jaxws.eval.classification import _binary_metric

__all__ = ["EvaluationBinary", "BinaryState"]


class BinaryState(NamedTuple):
    tp: Any  # f32 [K]
    fp: Any
    tn: Any
    fn: Any


class EvaluationBinary(Evaluator):
    """Accuracy, precision, recall, F1... per output of a multi-label (sigmoid) network.

    Example:
        >>> import numpy as np
        >>> from jaxws.eval import EvaluationBinary
        >>> ev = EvaluationBinary()
        >>> ev.eval(np.array([[1, 0], [0, 1]]), np.array([[0.9, 0.2], [0.6, 0.7]]))
        >>> ev.accuracy(0), ev.recall(1)
        (0.5, 1.0)
    """

    def __init__(self, size: int | None = None, *, thresholds: Sequence[float] | None = None):
        super().__init__()
        if thresholds is not None:
            thresholds = [float(t) for t in thresholds]
            if size is not None and len(thresholds) != size:
                raise EvaluationError(f"EvaluationBinary: {len(thresholds)} thresholds for size={size}.")
            size = len(thresholds)
        self.size = size
        self.thresholds = thresholds

    def _config(self) -> dict:
        return {"size": self.size, "thresholds": self.thresholds}

    def _static_key(self) -> tuple:
        return (type(self), self.size, None if self.thresholds is None else tuple(self.thresholds))

    def _init_key(self) -> tuple:
        return self._static_key()  # every setting the state's shapes follow

    def _configure(self, num_outputs: int) -> None:
        if self.size is None:
            self.size = num_outputs

    def init(self) -> BinaryState:
        if self.size is None:
            raise EvaluationError("EvaluationBinary.init(): size is unknown; pass it, or eval() data first.")
        return BinaryState(*(jnp.zeros((self.size,), jnp.float32) for _ in range(4)))

    def update(self, state, labels, predictions, mask=None) -> BinaryState:
        predictions = jnp.asarray(predictions)
        per_output = None
        if mask is not None and jnp.shape(mask) == predictions.shape:
            per_output, mask = jnp.asarray(mask, jnp.float32).reshape(-1, predictions.shape[-1]), None
        y, p, w, _ = flatten_batch(labels, predictions, mask, who="EvaluationBinary", sparse_ok=False)
        if p.shape[1] != self.size:
            raise EvaluationError(f"EvaluationBinary: predictions have {p.shape[1]} outputs, the evaluation {self.size}.")
        w = jnp.broadcast_to(w[:, None], p.shape) if per_output is None else per_output
        w = jnp.where(jnp.isnan(p), 0.0, w)
        threshold = 0.5 if self.thresholds is None else jnp.asarray(self.thresholds, p.dtype)
        pred, true = p >= threshold, y > 0.5
        count = lambda cond: jnp.sum(jnp.where(cond, w, 0.0), axis=0)  # noqa: E731
        return BinaryState(state.tp + count(pred & true), state.fp + count(pred & ~true),
                           state.tn + count(~pred & ~true), state.fn + count(~pred & true))

    def merge_states(self, a, b) -> BinaryState:
        return BinaryState(*(x + y for x, y in zip(a, b)))

    def compute(self, state) -> dict:
        return {k: np.asarray(v, np.float64) for k, v in state._asdict().items()}

    def _value(self, metric: str, output: int) -> float:
        c = self._require()
        if not 0 <= output < self.size:
            raise EvaluationError(f"EvaluationBinary: output {output} does not exist (0..{self.size - 1}).")
        if metric == "accuracy":
            total = c["tp"] + c["fp"] + c["tn"] + c["fn"]
            value = (c["tp"] + c["tn"])[output] / total[output] if total[output] else np.nan
        else:
            value = _binary_metric(metric, c["tp"], c["fp"], c["fn"], c["tn"])[output]
        return 0.0 if np.isnan(value) else float(value)

    def accuracy(self, output: int) -> float:
        return self._value("accuracy", output)

    def precision(self, output: int) -> float:
        return self._value("precision", output)

    def recall(self, output: int) -> float:
        return self._value("recall", output)

    def f1(self, output: int) -> float:
        return self._value("fbeta", output)

    def g_measure(self, output: int) -> float:
        return self._value("gmeasure", output)

    def matthews_correlation(self, output: int) -> float:
        return self._value("mcc", output)

    def false_positive_rate(self, output: int) -> float:
        return self._value("fpr", output)

    def false_negative_rate(self, output: int) -> float:
        return self._value("fnr", output)

    def average_accuracy(self) -> float:
        return float(np.mean([self.accuracy(i) for i in range(self.size)]))

    def average_f1(self) -> float:
        return float(np.mean([self.f1(i) for i in range(self.size)]))

    def stats(self) -> str:
        if self.state is None:
            return "EvaluationBinary: no data yet (call eval() or net.do_evaluation() first)."
        c = self.compute(self.state)
        rows = [f"{'output':>7} {'accuracy':>9} {'precision':>9} {'recall':>9} {'f1':>9} {'tp':>8} {'fp':>8} {'tn':>8} {'fn':>8}"]
        for i in range(self.size):
            rows.append(f"{i:>7} {self.accuracy(i):>9.4f} {self.precision(i):>9.4f} {self.recall(i):>9.4f} "
                        f"{self.f1(i):>9.4f} {c['tp'][i]:>8g} {c['fp'][i]:>8g} {c['tn'][i]:>8g} {c['fn'][i]:>8g}")
        return "\n".join(rows)
