"""Dealing batches to workers: round-robin groups of k rounds, stacked for one program.

A group holds, per worker, k batches ``[workers, k, batch, ...]`` and an ``active`` mask
``[workers, k]``; smaller batches are padded and masked out of the loss.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import numpy as np

from jaxws.data.dataset import DataSet, MultiDataSet
from jaxws.data.iterators import as_dataset
from jaxws.errors import InvalidBatchError

__all__ = ["Group", "deal", "stack"]


class Group(NamedTuple):
    data: DataSet | MultiDataSet  # leaves [workers, rounds, batch, ...]
    active: np.ndarray  # f32 [workers, rounds]: 1 where the worker had a batch


_FIELDS = ("features", "labels", "features_mask", "labels_mask")


def _labels_mask(labels: Any, mask: Any) -> np.ndarray:
    if mask is not None:
        return np.asarray(mask, np.float32)
    labels = np.asarray(labels)
    lead = labels.shape if np.issubdtype(labels.dtype, np.integer) else labels.shape[:-1]
    return np.ones(lead, np.float32)


def _fields(ds: DataSet | MultiDataSet) -> dict[str, list]:
    """A batch's arrays by field, one per input or output; every labels mask made explicit
    (padded examples are masked out of the loss)."""
    if isinstance(ds, MultiDataSet):
        inputs, outputs = len(ds.features), len(ds.labels)
        labels_masks = ds.labels_masks or (None,) * outputs
        return {"features": list(ds.features), "labels": list(ds.labels),
                "features_mask": list(ds.features_masks or (None,) * inputs),
                "labels_mask": [_labels_mask(y, m) for y, m in zip(ds.labels, labels_masks)]}
    return {"features": [ds.features], "labels": [ds.labels], "features_mask": [ds.features_mask],
            "labels_mask": [_labels_mask(ds.labels, ds.labels_mask)]}


def _rebuild(like: DataSet | MultiDataSet, out: dict[str, list]) -> DataSet | MultiDataSet:
    if isinstance(like, MultiDataSet):
        masks = out["features_mask"]
        return MultiDataSet(tuple(out["features"]), tuple(out["labels"]),
                            None if all(m is None for m in masks) else tuple(masks), tuple(out["labels_mask"]))
    return DataSet(**{name: out[name][0] for name in _FIELDS})


def stack(slots: list[list[DataSet | MultiDataSet | None]], batch: int | None = None) -> Group:
    """Stacks ``slots[round][worker]`` into a Group, padding batches to ``batch`` examples."""
    return (batch is None and _stack_alike(slots)) or _stack_padded(slots, batch)


def _stack_alike(slots: list[list[Any]]) -> Group | None:
    """The usual group: full rounds of DataSets alike (the same fields, shapes and dtypes),
    one ``np.stack`` a field. None for any other (a missing batch, a smaller one, a
    MultiDataSet): :func:`_stack_padded` pads it, or names the batch that does not fit."""
    rounds, workers = len(slots), len(slots[0])
    order = [row[w] for w in range(workers) for row in slots]  # worker-major: [workers, rounds]
    if any(type(ds) is not DataSet for ds in order) or order[0].labels is None:
        return None
    out = {}
    for name in _FIELDS:
        values = [getattr(ds, name) for ds in order]
        given = [v is not None for v in values]
        if not all(given):  # a field none has, or some (the padded path names them)
            if any(given):
                return None
            out[name] = None
            continue
        arrays = [np.asarray(v) for v in values]
        shape, dtype = arrays[0].shape, arrays[0].dtype
        if any(a.shape != shape or a.dtype != dtype for a in arrays):
            return None
        stacked = np.stack(arrays).reshape(workers, rounds, *shape)
        out[name] = stacked.astype(np.float32, copy=False) if name.endswith("mask") else stacked
    if out["labels_mask"] is None:  # every example counts: the padded path's explicit mask
        out["labels_mask"] = np.ones((workers, rounds, *_labels_mask(order[0].labels, None).shape), np.float32)
    return Group(DataSet(**out), np.ones((workers, rounds), np.float32))


def _stack_padded(slots: list[list[DataSet | MultiDataSet | None]], batch: int | None = None) -> Group:
    """:func:`stack` for any group: batches padded to ``batch`` examples, missing ones
    masked out, every misfit named."""
    present = [ds for row in slots for ds in row if ds is not None]
    first = present[0]
    batch = batch or max(ds.num_examples for ds in present)
    rounds, workers = len(slots), len(slots[0])
    if first.labels is None or (isinstance(first.labels, tuple) and not first.labels):
        raise InvalidBatchError("ParallelWrapper.fit: batches need labels.")
    template = _fields(first)
    out = {name: [None if v is None else np.zeros((workers, rounds, batch, *np.shape(v)[1:]),
                                                   np.float32 if name.endswith("mask") else np.asarray(v).dtype)
                  for v in values] for name, values in template.items()}
    active = np.zeros((workers, rounds), np.float32)
    for r, row in enumerate(slots):
        for w, ds in enumerate(row):
            if ds is None:
                continue
            active[w, r] = 1.0
            for name, values in _fields(ds).items():
                for j, (value, target) in enumerate(zip(values, out[name])):
                    label = name if len(values) == 1 else f"{name} {j}"
                    if (value is None) != (target is None) or len(values) != len(out[name]):
                        raise InvalidBatchError(
                            f"ParallelWrapper.fit: batch {r * workers + w} of the group "
                            f"{'has' if value is not None else 'lacks'} {label}, unlike the first batch."
                        )
                    if value is None:
                        continue
                    value = np.asarray(value)
                    if value.shape[1:] != target.shape[3:] or value.shape[0] > batch:
                        raise InvalidBatchError(
                            f"ParallelWrapper.fit: {label} of shape {list(value.shape)} does not stack with "
                            f"[{batch}, {', '.join(map(str, target.shape[3:]))}] (batch {r * workers + w} "
                            "of the group); every batch needs the shape of the first."
                        )
                    target[w, r, : value.shape[0]] = value
    return Group(_rebuild(first, out), active)


def deal(base: Any, workers: int, rounds: int) -> Iterator[list[list[DataSet | None]]]:
    """Round-robin: batch j to worker j mod workers; ``rounds`` rounds a group.

    The last group may have fewer rounds, and its last round fewer batches than workers.
    """
    it = iter(base)
    done = False
    while not done:
        slots = []
        for _ in range(rounds):
            row: list[DataSet | None] = [None] * workers
            for w in range(workers):
                item = next(it, None)
                if item is None:
                    done = True
                    break
                row[w] = item if isinstance(item, MultiDataSet) else as_dataset(item)
            if row[0] is not None:
                slots.append(row)
            if done:
                break
        if slots:
            yield slots
