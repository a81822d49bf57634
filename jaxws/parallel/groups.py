"""Dealing batches to workers: round-robin groups of k rounds, stacked for one program.

A group holds, per worker, k batches ``[workers, k, batch, ...]`` and an ``active`` mask
``[workers, k]``; smaller batches are padded and masked out of the loss.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import numpy as np

from jaxws.data.dataset import DataSet
from jaxws.data.iterators import as_dataset
from jaxws.errors import InvalidBatchError

__all__ = ["Group", "deal", "stack"]


class Group(NamedTuple):
    data: DataSet  # leaves [workers, rounds, batch, ...]
    active: np.ndarray  # f32 [workers, rounds]: 1 where the worker had a batch


def _labels_mask(ds: DataSet) -> np.ndarray:
    if ds.labels_mask is not None:
        return np.asarray(ds.labels_mask, np.float32)
    labels = np.asarray(ds.labels)
    lead = labels.shape if np.issubdtype(labels.dtype, np.integer) else labels.shape[:-1]
    return np.ones(lead, np.float32)


def stack(slots: list[list[DataSet | None]], batch: int | None = None) -> Group:
    """Stacks ``slots[round][worker]`` into a Group, padding batches to ``batch`` examples."""
    present = [ds for row in slots for ds in row if ds is not None]
    first = present[0]
    batch = batch or max(ds.num_examples for ds in present)
    rounds, workers = len(slots), len(slots[0])
    if first.labels is None:
        raise InvalidBatchError("ParallelWrapper.fit: batches need labels.")
    template = {
        "features": np.asarray(first.features),
        "labels": np.asarray(first.labels),
        "features_mask": None if first.features_mask is None else np.asarray(first.features_mask, np.float32),
        "labels_mask": _labels_mask(first),
    }
    out = {k: None if v is None else np.zeros((workers, rounds, batch, *v.shape[1:]), v.dtype)
           for k, v in template.items()}
    active = np.zeros((workers, rounds), np.float32)
    for r, row in enumerate(slots):
        for w, ds in enumerate(row):
            if ds is None:
                continue
            active[w, r] = 1.0
            fields = {"features": ds.features, "labels": ds.labels, "features_mask": ds.features_mask,
                      "labels_mask": _labels_mask(ds)}
            for name, value in fields.items():
                if (value is None) != (out[name] is None):
                    raise InvalidBatchError(
                        f"ParallelWrapper.fit: batch {r * workers + w} of the group "
                        f"{'has' if value is not None else 'lacks'} {name}, unlike the first batch."
                    )
                if value is None:
                    continue
                value = np.asarray(value)
                if value.shape[1:] != out[name].shape[3:] or value.shape[0] > batch:
                    raise InvalidBatchError(
                        f"ParallelWrapper.fit: {name} of shape {list(value.shape)} does not stack with "
                        f"[{batch}, {', '.join(map(str, out[name].shape[3:]))}] (batch {r * workers + w} "
                        "of the group); every batch needs the shape of the first."
                    )
                out[name][w, r, : value.shape[0]] = value
    return Group(DataSet(**out), active)


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
                row[w] = as_dataset(item)
            if row[0] is not None:
                slots.append(row)
            if done:
                break
        if slots:
            yield slots
