"""do_evaluation: the forward pass and every evaluator's update in one jitted step.

A mixin of the network models: evaluator states are donated through the step and never
read back inside the loop.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import numpy as np

from jaxws.errors import ConfigurationError, InvalidBatchError
from jaxws.interrupts import guarded
from jaxws.manager import get_workspace_manager
from jaxws.nn.checks import LabelCheck
from jaxws.nn.modes import WorkspaceMode
from jaxws.step import WorkspaceFunction, jit

__all__ = ["EvaluationMixin"]


class EvaluationMixin:
    """``do_evaluation`` and its shortcuts, for models with ``_apply``, ``_feed`` and ``_pinned``."""

    def _evaluation_fn(self, evaluations: tuple) -> WorkspaceFunction:
        key = tuple(ev._static_key() for ev in evaluations)
        if key not in self._eval_fns:
            def evaluate(states, check, params, state, ds):
                predictions = self._apply(params, state, ds.features, ds.features_mask, False, WorkspaceMode.SINGLE)[0]
                mask = ds.labels_mask
                if mask is None and predictions.ndim == 3:
                    mask = ds.features_mask
                states = tuple(ev.update(s, ds.labels, predictions, mask) for ev, s in zip(evaluations, states))
                return states, check.update(*(self._class_labels(ds) or (None, None, 0)))

            evaluate.__name__ = f"{type(self).__name__}.do_evaluation"
            self._eval_fns[key] = jit(evaluate, donate_argnums=(0, 1))
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

        self._require_init()
        if not evaluations:
            raise ConfigurationError("do_evaluation(data, *evaluations): pass at least one evaluator, e.g. jaxws.eval.Evaluation().")
        for i, ev in enumerate(evaluations):
            if not isinstance(ev, Evaluator):
                raise TypeError(f"do_evaluation: evaluations[{i}]={ev!r} is not a jaxws.eval.Evaluator.")
            if any(ev is other for other in evaluations[:i]):
                raise ConfigurationError(
                    f"do_evaluation: evaluations[{i}] is the same {type(ev).__name__} object as an "
                    "earlier one; it would count every batch twice. Pass each evaluator once (or a "
                    "second instance, e.g. Evaluation() twice)."
                )
        feed = self._feed(data, "do_evaluation", batch_size=batch_size, prefetch=prefetch, rewind="always")
        with feed:
            return self._evaluate(iter(feed), evaluations)

    def _evaluate(self, batches: Any, evaluations: tuple) -> tuple:
        """Runs every evaluator over ``batches`` (checked device DataSets)."""
        manager = get_workspace_manager()
        fn = self._evaluation_fn(evaluations)
        check = LabelCheck.init()
        with self._pinned() as carry, guarded() as guard:
            for ds in batches:
                if ds.labels is None:
                    raise InvalidBatchError("do_evaluation: a batch has no labels to evaluate against.")
                shape = self._output_shape(carry, ds)
                for ev in evaluations:
                    ev._ensure_state(shape)
                rows = int(np.prod(shape[:-1]))
                states = tuple(ev._reserve(ev.state, rows) for ev in evaluations)
                with guard, manager.scope_out_of_workspaces():  # states donated and stored in one commit
                    states, check = fn(states, check, carry.params, carry.state, ds)
                    for ev, state in zip(evaluations, states):
                        ev.state = state
        self._verify()
        with jax.transfer_guard_device_to_host("allow"):  # one read, at the end: not per batch
            check.raise_if_invalid("do_evaluation", self._labels_what(), self._num_classes())
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

        self._require_init()
        with self._feed(data, "evaluate_roc", batch_size=batch_size, rewind="always") as feed:
            batches = iter(feed)
            first = next(batches)  # its width picks the evaluator; it is evaluated too
            with self._pinned() as carry:
                width = self._output_shape(carry, first)[-1]
            roc = ROC(threshold_steps) if width <= 2 else ROCMultiClass(threshold_steps)
            return self._evaluate(itertools.chain([first], batches), (roc,))[0]

    def evaluate_regression(self, data: Any, *, batch_size: int | None = None):
        """``do_evaluation(data, RegressionEvaluation())``."""
        from jaxws.eval import RegressionEvaluation

        return self.do_evaluation(data, RegressionEvaluation(), batch_size=batch_size)[0]

