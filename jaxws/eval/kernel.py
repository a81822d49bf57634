"""do_evaluation: the forward pass and every evaluator's update in one jitted step; score.

A mixin of the network models: evaluator states (and score's running total) are donated
through the step and never read back inside the loop.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxws.arrays import allow_reads
from jaxws.errors import ConfigurationError, InvalidBatchError
from jaxws.interrupts import guarded
from jaxws.manager import get_workspace_manager
from jaxws.nn.checks import FitChecks, LabelCheck
from jaxws.nn.modes import WorkspaceMode
from jaxws.step import WorkspaceFunction, jit

__all__ = ["EvaluationMixin"]


def _zero_total() -> jax.Array:
    """A new float32 0 for score's running total (donated to its program)."""
    return jnp.zeros((), jnp.float32)


_fresh_total = jax.jit(_zero_total)  # one cached program, 5 us a call, where an eager jnp.zeros takes 27


class EvaluationMixin:
    """``do_evaluation``, its shortcuts and ``score``, for models with ``_apply``, ``_loss``,
    ``_inputs_of``, ``_feed`` and ``_pinned``."""

    def _eval_targets(self, predictions: Any, ds: Any, index: int) -> tuple:
        """``(labels, predictions, mask)`` that the evaluators of output ``index`` see."""
        mask = ds.labels_mask
        if mask is None and predictions.ndim == 3:
            mask = ds.features_mask
        return ds.labels, predictions, mask

    def _evaluation_fn(self, evaluations: tuple, outputs: tuple) -> WorkspaceFunction:
        key = (tuple(ev._static_key() for ev in evaluations), outputs)
        if key not in self._eval_fns:
            def evaluate(states, check, params, state, ds):  # check None: labels judged on the host
                predictions = self._apply(params, state, *self._inputs_of(ds), False, WorkspaceMode.SINGLE)[0]
                states = tuple(ev.init() if s is None else s for ev, s in zip(evaluations, states))  # None: made here
                states = tuple(ev.update(s, *self._eval_targets(predictions, ds, i))
                               for ev, s, i in zip(evaluations, states, outputs))
                return states, None if check is None else check.update(*(self._class_labels(ds) or (None, None, 0)))

            evaluate.__name__ = f"{type(self).__name__}.do_evaluation"
            self._eval_fns[key] = jit(evaluate, donate_argnums=(0, 1))
        return self._eval_fns[key]

    def do_evaluation(self, data: Any, *evaluations: Any, batch_size: int | None = None, prefetch: int = 8) -> tuple:
        """One pass over ``data`` updating every evaluator inside one jitted step.

        The forward pass and all evaluators' updates run in a single program per batch;
        the evaluators' states are donated through it and nothing is read back until you
        ask an evaluator for a metric. Evaluators that already hold data keep adding to it.

        Args:
            data: as for ``fit``; iterators are prefetched asynchronously (on the CPU
                backend, as in ``fit``, host data already in memory is read in this thread).
            *evaluations: Evaluation, ROC, ROCMultiClass, ROCBinary, EvaluationBinary,
                RegressionEvaluation, or your own Evaluator. A model of several outputs (a
                ComputationGraph) takes the output first, ``do_evaluation(data, 1, Evaluation())``,
                or one mapping of output names (or indices) to evaluators,
                ``do_evaluation(data, {"classes": Evaluation(), "value": RegressionEvaluation()})``.
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
        evaluations, outputs = self._evaluators(evaluations)
        if not evaluations:
            raise ConfigurationError("do_evaluation(data, *evaluations): pass at least one evaluator, e.g. jaxws.eval.Evaluation().")
        for i, ev in enumerate(evaluations):
            if not isinstance(ev, Evaluator):
                raise ConfigurationError(f"do_evaluation: evaluations[{i}]={ev!r} is not a jaxws.eval.Evaluator.")
            if any(ev is other for other in evaluations[:i]):
                raise ConfigurationError(
                    f"do_evaluation: evaluations[{i}] is the same {type(ev).__name__} object as an "
                    "earlier one; it would count every batch twice. Pass each evaluator once (or a "
                    "second instance, e.g. Evaluation() twice)."
                )
        feed = self._feed(data, "do_evaluation", batch_size=batch_size, prefetch=prefetch, rewind="always")
        with feed:
            return self._evaluate(feed.signed(), evaluations, outputs, feed.one_batch)

    def _output_names(self) -> tuple:
        """The model's outputs, by name (one for a MultiLayerNetwork)."""
        return ("output",)

    def _evaluators(self, args: tuple) -> tuple[tuple, tuple]:
        """``(evaluators, the output index each reads)`` from do_evaluation's arguments."""
        names = self._output_names()

        def index(key: Any) -> int:
            if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(names):
                return key
            if key in names:
                return names.index(key)
            raise ConfigurationError(f"do_evaluation: no output {key!r}; the outputs are {list(names)} (or their indices 0..{len(names) - 1}).")

        if len(args) == 1 and isinstance(args[0], dict):
            pairs = [(index(k), ev) for k, evs in args[0].items() for ev in (evs if isinstance(evs, (list, tuple)) else (evs,))]
        elif args and ((isinstance(args[0], int) and not isinstance(args[0], bool))
                       or (isinstance(args[0], str) and args[0] in names)):
            pairs = [(index(args[0]), ev) for ev in args[1:]]
        else:
            if len(names) > 1:
                raise ConfigurationError(
                    f"do_evaluation: the model has {len(names)} outputs {list(names)}; say which each "
                    f"evaluator reads: do_evaluation(data, 0, Evaluation()) or do_evaluation(data, "
                    f"{{{names[0]!r}: Evaluation()}})."
                )
            pairs = [(0, ev) for ev in args]
        return tuple(ev for _, ev in pairs), tuple(i for i, _ in pairs)

    def _evaluate(self, pairs: Any, evaluations: tuple, outputs: tuple, one_batch: bool = False) -> tuple:
        """Runs every evaluator over ``pairs`` (checked batches and their signatures, from
        ``Feed.signed``); evaluator i reads output ``outputs[i]``. Labels the feed judged on
        the host (a ``Judged`` signature) are not counted on the device again. ``one_batch``:
        the pass is one batch, whose program makes the fresh evaluators' empty states and
        the label check (DL4J's ``evaluate(ds)`` per batch: one dispatch a call, not three)."""
        manager = get_workspace_manager()
        fn = self._evaluation_fn(evaluations, outputs)
        checks = FitChecks()  # its check made at the first batch counted on the device
        avals = None  # the states' avals: kept through the pass (states are stable) until one grows
        with self._pinned() as carry, guarded() as guard, manager.scope_out_of_workspaces():
            for ds, signature in pairs:
                if ds.labels is None or (isinstance(ds.labels, tuple) and not ds.labels):
                    raise InvalidBatchError("do_evaluation: a batch has no labels to evaluate against.")
                states = []
                for ev, i in zip(evaluations, outputs):
                    shape = self._output_shape(carry, ds, i, signature)
                    if one_batch and ev._made_in_program(shape):
                        states.append(None)
                        continue
                    ev._ensure_state(shape)
                    state = ev._reserve(ev.state, math.prod(shape[:-1]))
                    if state is not ev.state:  # grown (an exact ROC's buffers)
                        avals = None
                    states.append(state)
                states = tuple(states)
                if avals is None:
                    avals = (tuple([s is None for s in states]), *[x.aval for x in jax.tree.leaves(states)])
                with guard:  # states donated and stored in one commit
                    states = self._counted(fn, checks, signature, (signature, avals), states, carry, ds, one_batch)
                    for ev, state in zip(evaluations, states):
                        ev.state = state
        self._verify()
        self._raise_if_counted_invalid("do_evaluation", checks)
        return evaluations

    def _counted(self, fn: WorkspaceFunction, checks: FitChecks, signature: Any, plan: Any, total: Any,
                 carry: Any, ds: Any, one_batch: bool = False) -> Any:
        """``fn``'s new ``total`` after one batch; the batch's labels counted into ``checks``
        on the device unless there is nothing to count there (judged on the host: a
        ``Judged`` signature; not integer class labels). ``fn`` runs on jaxws.jit's lean
        path, planned per ``plan`` (the batch ``signature``, with ``total``'s avals where
        they can change): the model's pinned carry, a checked batch and states of its own.
        ``one_batch``: a new check is made by ``fn`` itself (:meth:`LabelCheck.unmade`)."""
        if self._counted_apart(checks, signature, ds):
            total = fn._call_planned((plan, False), (total, None, carry.params, carry.state, ds))[0]
        else:
            unmade = one_batch and checks.state is None and not checks.lag
            args = (total, LabelCheck.unmade() if unmade else checks.counting(), carry.params, carry.state, ds)
            total, checks.state = fn._call_planned((plan, "unmade" if unmade else True), args)
        checks.steps += 1
        return total

    def _raise_if_counted_invalid(self, op: str, checks: FitChecks) -> None:
        """The one read of a pass's label count, at its end; none when every batch's labels
        were judged on the host."""
        if checks.settle():
            with allow_reads():  # asked for: not a hidden sync
                checks.state.raise_if_invalid(op, self._labels_what(), self._num_classes())

    def _output_shape(self, carry: Any, ds: Any, index: int = 0, signature: Any = None) -> tuple:
        """The shape of output ``index`` on batch ``ds``; with the batch's ``signature``
        (the feed's), looked up by it, without reading the inputs' shapes."""
        shapes = self._output_shapes
        known = shapes.get((signature, index)) if signature is not None else None
        if known is not None:
            return known
        inputs = self._inputs_of(ds)
        key = (jax.tree.map(lambda a: (a.shape, a.dtype), inputs), index)
        if key not in shapes:
            out = jax.eval_shape(self._inference_fn(False), carry.params, carry.state, *inputs)
            shapes[key] = (out[index] if isinstance(out, (tuple, list)) else out).shape
        if signature is not None:
            shapes[(signature, index)] = shapes[key]
        return shapes[key]

    def evaluate(self, data: Any, *, batch_size: int | None = None):
        """``do_evaluation(data, Evaluation())``: classification metrics."""
        from jaxws.eval import Evaluation

        return self.do_evaluation(data, Evaluation(), batch_size=batch_size)[0]

    def evaluate_roc(self, data: Any, threshold_steps: int = 0, *, batch_size: int | None = None):
        """ROC (one or two outputs) or ROCMultiClass (more), exact by default."""
        from jaxws.eval import ROC, ROCMultiClass

        self._require_init()
        with self._feed(data, "evaluate_roc", batch_size=batch_size, rewind="always") as feed:
            pairs = feed.signed()
            self._evaluators(())  # one output, or the error saying so
            first = next(pairs)  # its width picks the evaluator; it is evaluated too
            with self._pinned() as carry:
                width = self._output_shape(carry, first[0])[-1]
            roc = ROC(threshold_steps) if width <= 2 else ROCMultiClass(threshold_steps)
            return self._evaluate(itertools.chain([first], pairs), (roc,), (0,), feed.one_batch)[0]

    def evaluate_regression(self, data: Any, *, batch_size: int | None = None):
        """``do_evaluation(data, RegressionEvaluation())``."""
        from jaxws.eval import RegressionEvaluation

        return self.do_evaluation(data, RegressionEvaluation(), batch_size=batch_size)[0]

    def score(self, data: Any, *, batch_size: int | None = None) -> float:
        """The mean loss over all of ``data`` (inference mode), weighted by examples; one sync.

        A resettable iterator is reset first, so the whole data is scored; one parameter
        version scores every batch, even while another thread trains.
        """
        self._require_init()
        if self._score_fn is None:
            def score(total, check, params, state, ds):  # check None: labels judged on the host
                loss = self._loss(params, state, ds, False, WorkspaceMode.SINGLE)[0]
                n = jax.tree.leaves(ds)[0].shape[0]
                total = _zero_total() if total is None else total  # None: a pass of one batch, made here
                return total + loss * n, None if check is None else check.update(
                    *(self._class_labels(ds) or (None, None, 0)))

            score.__name__ = f"{type(self).__name__}.score"
            self._score_fn = jit(score, donate_argnums=(0, 1))
        checks, count = FitChecks(), 0
        feed = self._feed(data, "score", batch_size=batch_size, rewind="always")
        one_batch = feed.one_batch  # its program makes the total and the check: one dispatch a call
        total = None if one_batch else _fresh_total()
        with feed, self._pinned() as carry, get_workspace_manager().scope_out_of_workspaces():
            for ds, signature in feed.signed():
                plan = (signature, "fresh") if total is None else signature
                total = self._counted(self._score_fn, checks, signature, plan, total, carry, ds, one_batch)
                count += ds.num_examples
        self._verify()
        self._raise_if_counted_invalid("score", checks)
        if count == 0:
            raise ConfigurationError("score(data): the data has no examples; pass at least one example.")
        return float(np.asarray(total)) / count  # float() of a device scalar takes 4x as long
