"""Base iterators: ArrayDataSetIterator over in-memory arrays, from_iterable for the rest.

Every iterator is a Python iterator with ``reset()``, ``reset_supported`` and
``async_supported`` (whether ``fit`` may wrap it in an AsyncDataSetIterator).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from jaxws.data.dataset import DataSet, MultiDataSet
from jaxws.errors import ConfigurationError

__all__ = ["DataSetIterator", "ArrayDataSetIterator", "IterableDataSetIterator", "from_iterable", "as_dataset"]


def as_dataset(item: Any) -> DataSet | MultiDataSet:
    """A DataSet (or MultiDataSet) from a DataSet, an ``(x, y)`` pair, a dict or an array."""
    if isinstance(item, (DataSet, MultiDataSet)):
        return item
    if hasattr(item, "shape"):  # features alone: inference, or unsupervised data
        return DataSet(item)
    if isinstance(item, (tuple, list)) and 2 <= len(item) <= 4:
        return DataSet(*item)
    if isinstance(item, dict):
        names = {"features": ("features", "x"), "labels": ("labels", "y"),
                 "features_mask": ("features_mask",), "labels_mask": ("labels_mask",)}
        unknown = set(item) - {n for group in names.values() for n in group}
        if unknown:
            raise ConfigurationError(f"A batch dict has unknown keys {sorted(unknown)}; use features/labels/features_mask/labels_mask (or x/y).")
        return DataSet(**{k: next((item[n] for n in group if n in item), None) for k, group in names.items()})
    raise TypeError(
        f"Expected a DataSet, an (x, y) pair or a dict with 'features' and 'labels'; got "
        f"{type(item).__name__}."
    )


class DataSetIterator(Iterator):
    """Base class: a Python iterator of DataSets that may be reset."""

    reset_supported = True
    async_supported = True

    def reset(self) -> None:
        """Starts again from the first batch."""

    def __iter__(self) -> DataSetIterator:
        return self


class ArrayDataSetIterator(DataSetIterator):
    """Batches of in-memory arrays (numpy or JAX), optionally shuffled each epoch.

    Example:
        >>> import numpy as np
        >>> from jaxws.data import ArrayDataSetIterator
        >>> it = ArrayDataSetIterator(np.arange(10.0)[:, None], np.arange(10), batch_size=4)
        >>> [b.num_examples for b in it], len(it)
        ([4, 4, 2], 3)
    """

    def __init__(
        self,
        x: Any,
        y: Any = None,
        batch_size: int = 32,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        features_mask: Any = None,
        labels_mask: Any = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"ArrayDataSetIterator(batch_size={batch_size!r}): expected an int >= 1.")
        n = len(x)
        for name, a in (("y", y), ("features_mask", features_mask), ("labels_mask", labels_mask)):
            if a is not None and len(a) != n:
                raise ConfigurationError(f"ArrayDataSetIterator: x has {n} examples but {name} has {len(a)}.")
        self._data = DataSet(x, y, features_mask, labels_mask)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._rng = np.random.default_rng(seed)
        self._n = n
        self.reset()

    def __len__(self) -> int:
        return self._n // self.batch_size if self.drop_last else math.ceil(self._n / self.batch_size)

    @property
    def num_examples(self) -> int:
        return self._n

    def reset(self) -> None:
        self._order = self._rng.permutation(self._n) if self.shuffle else None
        self._position = 0

    def __next__(self) -> DataSet:
        start = self._position
        stop = min(start + self.batch_size, self._n)
        if start >= self._n or (self.drop_last and stop - start < self.batch_size):
            raise StopIteration
        self._position = stop
        index = slice(start, stop) if self._order is None else self._order[start:stop]
        return DataSet(*(None if a is None else a[index] for a in (
            self._data.features, self._data.labels, self._data.features_mask, self._data.labels_mask)))


class IterableDataSetIterator(DataSetIterator):
    """Wraps an iterable, or a factory of iterables, that yields batches."""

    def __init__(self, source: Iterable | Callable[[], Iterable]):
        self._factory = source if callable(source) and not hasattr(source, "__iter__") else None
        self._source = source
        self.reset_supported = self._factory is not None or not isinstance(source, Iterator)
        self._it: Iterator | None = None
        self._started = False
        self.reset()

    def reset(self) -> None:
        if self._started and not self.reset_supported:
            raise ConfigurationError(
                "This iterator wraps a one-shot iterator (a generator) and cannot restart; "
                "pass a function that makes a new one: from_iterable(lambda: gen())."
            )
        self._it = iter(self._factory() if self._factory else self._source)
        self._started = False

    def __len__(self) -> int:
        return len(self._source)  # TypeError for sources without a length, as len() does

    def __next__(self) -> DataSet | MultiDataSet:
        self._started = True
        return as_dataset(next(self._it))

    def close(self) -> None:
        """Closes the current source iterator if it is a generator (its ``finally`` runs)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def from_iterable(source: Iterable | Callable[[], Iterable]) -> IterableDataSetIterator:
    """A DataSetIterator over an iterable of batches, or over a function that makes one.

    Batches may be DataSets, ``(x, y)`` pairs or dicts. A function (``lambda:
    my_generator()``) or a re-iterable (a list) can be reset; a bare generator cannot.

    Example:
        >>> import numpy as np
        >>> from jaxws.data import from_iterable
        >>> it = from_iterable(lambda: ((np.ones((2, 3)), np.zeros(2)) for _ in range(3)))
        >>> len(list(it)), it.reset_supported
        (3, True)
    """
    return IterableDataSetIterator(source)
