"""RegressionEvaluation: per-column error and correlation statistics, merged exactly.

The state holds counts, means and centred sums per column (Chan's parallel update), so
merging shards is associative and float32 sums do not drift over a million examples.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxws.errors import EvaluationError
from jaxws.eval.base import Evaluator, flatten_batch

__all__ = ["RegressionEvaluation", "RegressionState"]


class RegressionState(NamedTuple):
    n: Any  # f32 [C] weighted count
    mean_y: Any
    mean_p: Any
    m2_y: Any  # sum of squared deviations of labels
    m2_p: Any
    c_yp: Any  # co-moment
    sse: Any  # sum of squared errors
    sae: Any  # sum of absolute errors


def _combine(a: RegressionState, b: RegressionState) -> RegressionState:
    n = a.n + b.n
    safe = jnp.where(n > 0, n, 1.0)
    dy, dp = b.mean_y - a.mean_y, b.mean_p - a.mean_p
    f = a.n * b.n / safe
    return RegressionState(
        n, a.mean_y + dy * b.n / safe, a.mean_p + dp * b.n / safe,
        a.m2_y + b.m2_y + dy * dy * f, a.m2_p + b.m2_p + dp * dp * f, a.c_yp + b.c_yp + dy * dp * f,
        a.sse + b.sse, a.sae + b.sae,
    )


class RegressionEvaluation(Evaluator):
    """MSE, MAE, RMSE, relative squared error, Pearson correlation and R^2 per column.

    Example:
        >>> import numpy as np
        >>> from jaxws.eval import RegressionEvaluation
        >>> ev = RegressionEvaluation(1)
        >>> ev.eval(np.array([[1.0], [2.0], [3.0]]), np.array([[1.0], [2.0], [4.0]]))
        >>> round(ev.mean_squared_error(0), 4), round(ev.r_squared(0), 4)
        (0.3333, 0.5)
    """

    def __init__(self, num_columns: int | None = None):
        super().__init__()
        if num_columns is not None and (isinstance(num_columns, bool) or not isinstance(num_columns, int) or num_columns < 1):
            raise EvaluationError(f"RegressionEvaluation(num_columns={num_columns!r}): expected an int >= 1.")
        self.num_columns = num_columns

    def _config(self) -> dict:
        return {"num_columns": self.num_columns}

    def _static_key(self) -> tuple:
        return (type(self), self.num_columns)

    def _init_key(self) -> tuple:
        return self._static_key()  # every setting the state's shapes follow

    def _configure(self, num_outputs: int) -> None:
        if self.num_columns is None:
            self.num_columns = num_outputs

    def init(self) -> RegressionState:
        if self.num_columns is None:
            raise EvaluationError("RegressionEvaluation.init(): num_columns is unknown; pass it, or eval() data first.")
        return RegressionState(*(jnp.zeros((self.num_columns,), jnp.float32) for _ in range(8)))

    def update(self, state, labels, predictions, mask=None) -> RegressionState:
        y, p, w, _ = flatten_batch(labels, predictions, mask, who="RegressionEvaluation", sparse_ok=False)
        if p.shape[1] != self.num_columns:
            raise EvaluationError(f"RegressionEvaluation: predictions have {p.shape[1]} columns, the evaluation {self.num_columns}.")
        y = y.astype(jnp.float32)
        w = jnp.broadcast_to(w[:, None], p.shape) * ~jnp.isnan(p)
        p = jnp.where(w > 0, p, 0.0)
        n = w.sum(0)
        safe = jnp.where(n > 0, n, 1.0)
        my, mp = (w * y).sum(0) / safe, (w * p).sum(0) / safe
        dy, dp = y - my, p - mp
        err = p - y
        batch = RegressionState(n, my, mp, (w * dy * dy).sum(0), (w * dp * dp).sum(0), (w * dy * dp).sum(0),
                                (w * err * err).sum(0), (w * jnp.abs(err)).sum(0))
        return _combine(state, batch)

    def merge_states(self, a, b) -> RegressionState:
        return _combine(a, b)

    def compute(self, state) -> dict:
        s = {k: np.asarray(v, np.float64) for k, v in state._asdict().items()}
        n = np.where(s["n"] > 0, s["n"], np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            return {
                "mse": s["sse"] / n, "mae": s["sae"] / n, "rmse": np.sqrt(s["sse"] / n),
                "rse": s["sse"] / s["m2_y"], "pearson": s["c_yp"] / np.sqrt(s["m2_y"] * s["m2_p"]),
                "r2": 1.0 - s["sse"] / s["m2_y"], "n": s["n"],
            }

    def _col(self, key: str, col: int) -> float:
        values = self._require()[key]
        if not 0 <= col < len(values):
            raise EvaluationError(f"RegressionEvaluation: column {col} does not exist (0..{len(values) - 1}).")
        return float(values[col])

    def mean_squared_error(self, col: int) -> float:
        return self._col("mse", col)

    def mean_absolute_error(self, col: int) -> float:
        return self._col("mae", col)

    def root_mean_squared_error(self, col: int) -> float:
        return self._col("rmse", col)

    def relative_squared_error(self, col: int) -> float:
        return self._col("rse", col)

    def pearson_correlation(self, col: int) -> float:
        return self._col("pearson", col)

    def r_squared(self, col: int) -> float:
        return self._col("r2", col)

    def _average(self, key: str) -> float:
        return float(np.mean(self._require()[key]))

    def average_mean_squared_error(self) -> float:
        return self._average("mse")

    def average_mean_absolute_error(self) -> float:
        return self._average("mae")

    def average_root_mean_squared_error(self) -> float:
        return self._average("rmse")

    def average_relative_squared_error(self) -> float:
        return self._average("rse")

    def average_pearson_correlation(self) -> float:
        return self._average("pearson")

    def average_r_squared(self) -> float:
        return self._average("r2")

    def stats(self) -> str:
        if self.state is None:
            return "RegressionEvaluation: no data yet (call eval() or net.do_evaluation() first)."
        r = self.compute(self.state)
        rows = [f"{'Column':<8} {'MSE':>12} {'MAE':>12} {'RMSE':>12} {'RSE':>12} {'PC':>12} {'R^2':>12}"]
        for c in range(self.num_columns):
            rows.append(f"{'col_' + str(c):<8} " + " ".join(f"{r[k][c]:>12.5e}" for k in ("mse", "mae", "rmse", "rse", "pearson", "r2")))
        return "\n".join(rows)
