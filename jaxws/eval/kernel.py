"""do_evaluation: the forward pass and every evaluator's update in one jitted step.

A mixin of the network models: evaluator states are donated through the step and never
read back inside the loop.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import numpy as np

from jaxws.data.iterators import as_dataset
from jaxws.data.prefetch import AsyncDataSetIterator, consuming
from jaxws.errors import ConfigurationError, InvalidBatchError
from jaxws.manager import get_workspace_manager
from jaxws.nn.modes import WorkspaceMode
from jaxws.step import WorkspaceFunction, jit

__all__ = ["EvaluationMixin"]


class EvaluationMixin:
    """``do_evaluation`` and its shortcuts, for models with ``_apply`` and ``_source``."""

    def _evaluation_fn(self, evaluations: tuple) -> WorkspaceFunction:
        key = tuple(ev._static_key() for ev in evaluations)
        if key not in self._eval_fns:
            def evaluate(states, params, state, ds):
                predictions = self._apply(params, state, ds.features, ds.features_mask, False, WorkspaceMode.SINGLE)[0]
                mask = ds.labels_mask
                if mask is None and predictions.ndim == 3:
                    mask = ds.features_mask
                return tuple(ev.update(s, ds.labels, predictions, mask) for ev, s in zip(evaluations, states))

            evaluate.__name__ = f"{type(self).__name__}.do_evaluation"
            self._eval_fns[key] = jit(evaluate, donate_argnums=0)
        return self._eval_fns[key]

    def do_evaluation(self, data: Any, *evaluations: Any, batch_size: int | None = None, prefetch: int = 8) -> tuple:
        """One pass over ``data`` updating every evaluator inside one jitted step.

        The forward pass and all evaluators' updates run in a single program per batch;
        the evaluators' states are donated through it and nothing is read back until you
        ask an evaluator for a metric. Evaluators that already hold data keep adding to it.

        Args:
            data: as for ``fit``; iterators are prefetched asynchronously.
            *evaluations: Evaluation, ROC, ROCMultiClass, ROCBinary, EvaluationBinary,
                RegressionEvaluation, or your own Evaluator.
            batch_size: split a single DataSet / pair into batches of this size.

        Returns:
            The evaluations, in the order given.

        Example:
            >>> import numpy as np, jaxws
            >>> from jaxws.eval import Evaluation, ROCMultiClass
            >>> from jaxws.nn import MultiLayerNetwork, NeuralNetConfiguration, OutputLayer
            >>> net = MultiLayerNetwork(NeuralNetConfiguration(layers=[OutputLayer(3)], input_shape=(4,))).init()
            >>> x = np.ones((10, 4), np.float32); y = np.zeros(10, np.int32)
            >>> ev, roc = net.do_evaluation((x, y), Evaluation(), ROCMultiClass(100), batch_size=5)
            >>> int(ev.confusion_matrix().sum())
            10
        """
        from jaxws.eval.base import Evaluator

        carry = self._require_init()
        if not evaluations:
            raise ConfigurationError("do_evaluation(data, *evaluations): pass at least one evaluator, e.g. jaxws.eval.Evaluation().")
        for i, ev in enumerate(evaluations):
            if not isinstance(ev, Evaluator):
                raise TypeError(f"do_evaluation: evaluations[{i}]={ev!r} is not a jaxws.eval.Evaluator.")
        source = self._source(data, 1, batch_size, "do_evaluation", prefetch)
        checked = isinstance(source, AsyncDataSetIterator)
        manager = get_workspace_manager()
        with consuming(source, data):
            for item in source:
                ds = self._device_batch(as_dataset(item), "do_evaluation", checked)
                if ds.labels is None:
                    raise InvalidBatchError("do_evaluation: a batch has no labels to evaluate against.")
                shape = self._output_shape(carry, ds)
                for ev in evaluations:
                    ev._ensure_state(shape)
                rows = int(np.prod(shape[:-1]))
                states = tuple(ev._reserve(ev.state, rows) for ev in evaluations)
                with manager.scope_out_of_workspaces():  # evaluator states outlive every cycle
                    states = self._evaluation_fn(evaluations)(states, carry.params, carry.state, ds)
                for ev, state in zip(evaluations, states):
                    ev.state = state
        return evaluations

    def _output_shape(self, carry: Any, ds: Any) -> tuple:
        key = (ds.features.shape, ds.features.dtype, None if ds.features_mask is None else ds.features_mask.shape)
        if key not in self._output_shapes:
            out = jax.eval_shape(self._inference_fn(False), carry.params, carry.state, ds.features, ds.features_mask)
            self._output_shapes[key] = out.shape
        return self._output_shapes[key]

    def evaluate(self, data: Any, *, batch_size: int | None = None):
        """``do_evaluation(data, Evaluation())``: classification metrics."""
        from jaxws.eval import Evaluation

        return self.do_evaluation(data, Evaluation(), batch_size=batch_size)[0]

    def evaluate_roc(self, data: Any, threshold_steps: int = 0, *, batch_size: int | None = None):
        """ROC (one or two outputs) or ROCMultiClass (more), exact by default."""
        from jaxws.eval import ROC, ROCMultiClass

        batches = iter(self._source(data, 1, batch_size, "evaluate_roc", 0))
        first = next(batches, None)  # its width picks the evaluator; it is evaluated too
        width = None if first is None else self._output_shape(self._require_init(), self._device_batch(as_dataset(first), "evaluate_roc"))[-1]
        roc = ROC(threshold_steps) if width is not None and width <= 2 else ROCMultiClass(threshold_steps)
        rest = [] if first is None else itertools.chain([first], batches)
        return self.do_evaluation(rest, roc)[0]

    def evaluate_regression(self, data: Any, *, batch_size: int | None = None):
        """``do_evaluation(data, RegressionEvaluation())``."""
        from jaxws.eval import RegressionEvaluation

        return self.do_evaluation(data, RegressionEvaluation(), batch_size=batch_size)[0]

