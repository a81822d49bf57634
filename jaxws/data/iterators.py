"""Base iterators: ArrayDataSetIterator over in-memory arrays, from_iterable for the rest.

Every iterator is a Python iterator with ``reset()``, ``reset_supported`` and
``async_supported`` (whether ``fit`` may wrap it in an AsyncDataSetIterator).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxws.data.dataset import DataSet, MultiDataSet
from jaxws.errors import ConfigurationError

__all__ = [
    "DataSetIterator",
    "ArrayDataSetIterator",
    "ArrayMultiDataSetIterator",
    "IterableDataSetIterator",
    "from_iterable",
    "as_dataset",
    "as_multi_dataset",
    "AsyncShieldDataSetIterator",
    "AsyncShieldMultiDataSetIterator",
]


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
    raise ConfigurationError(
        "expected a DataSet, an (x, y) pair, an array of features or a dict with 'features' and "
        f"'labels'; got {type(item).__name__}."
    )


def _as_tuple(value: Any) -> tuple | None:
    if value is None:
        return None
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def as_multi_dataset(item: Any) -> MultiDataSet:
    """A MultiDataSet from a MultiDataSet, an ``(inputs, labels[, features_masks,
    labels_masks])`` tuple of lists, a DataSet (one input, one output) or an array.

    Example:
        >>> import numpy as np
        >>> from jaxws.data import as_multi_dataset
        >>> ds = as_multi_dataset(([np.ones((2, 3)), np.ones((2, 1))], [np.zeros(2)]))
        >>> len(ds.features), len(ds.labels)
        (2, 1)
    """
    if isinstance(item, MultiDataSet):
        return item
    if isinstance(item, dict) or hasattr(item, "shape"):
        item = as_dataset(item)
    if isinstance(item, DataSet):
        fields = (item.features, item.labels, item.features_mask, item.labels_mask)
    elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 4:
        fields = (*item, *(None,) * (4 - len(item)))
    else:
        raise ConfigurationError(
            f"expected a MultiDataSet or an (inputs, labels) pair of lists, e.g. ([x_a, x_b], [y]); "
            f"got {type(item).__name__}."
        )
    features, labels, features_masks, labels_masks = map(_as_tuple, fields)
    return MultiDataSet(features, labels or (), features_masks, labels_masks)


class DataSetIterator(Iterator):
    """Base class: a Python iterator of DataSets that may be reset."""

    reset_supported = True
    async_supported = True

    def reset(self) -> None:
        """Starts again from the first batch."""

    def __iter__(self) -> DataSetIterator:
        return self


_RESIDENT_BYTES = 1 << 30  # host data up to this size is put on the device for fit (GPU: 1/4 of it)


class ArrayDataSetIterator(DataSetIterator):
    """Batches of in-memory arrays (numpy or JAX), optionally shuffled each epoch.

    Epoch ``e`` visits the examples in the order ``numpy.random.default_rng([seed, e])``
    permutes them into (or in order without ``shuffle``); ``reset()`` starts the next
    epoch. ``fit`` runs such an iterator *device-resident* when its data fits on the
    device: the arrays are put there once (device arrays are used in place, never copied
    or donated) and each batch is taken inside the compiled program, in the same order,
    so the numbers are those of iterating it batch by batch.

    Args:
        x, y, features_mask, labels_mask: arrays with the examples on axis 0.
        batch_size: examples per batch; the last batch of an epoch may be smaller.
        shuffle: a new permutation each epoch.
        seed: seeds the permutations.
        drop_last: skip the last, smaller batch of an epoch.
        resident: ``None`` (default): device-resident in ``fit`` when the data is already
            on the device or small enough (1 GiB here; a quarter of a GPU's memory); True:
            always; False: never (batches are cut on the host and prefetched).

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
        resident: bool | None = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"ArrayDataSetIterator(batch_size={batch_size!r}): expected an int >= 1.")
        if resident not in (None, True, False):
            raise ConfigurationError(f"ArrayDataSetIterator(resident={resident!r}): expected None (auto), True or False.")
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(flag, (bool, np.bool_)):
                raise ConfigurationError(f"ArrayDataSetIterator({name}={flag!r}): expected True or False.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigurationError(f"ArrayDataSetIterator(seed={seed!r}): expected an int >= 0 (numpy's seeds are).")
        if not hasattr(x, "__len__"):
            raise ConfigurationError(
                f"ArrayDataSetIterator(x=<{type(x).__name__}>): expected the features, an array "
                "(or a nested list) with one row per example."
            )
        n = len(x)
        for name, a in (("y", y), ("features_mask", features_mask), ("labels_mask", labels_mask)):
            if a is not None and len(a) != n:
                raise ConfigurationError(f"ArrayDataSetIterator: x has {n} examples but {name} has {len(a)}.")
        self._data = DataSet(x, y, features_mask, labels_mask)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.resident = resident
        self._n = n
        self.epoch = 0
        self._position = 0
        self._order: np.ndarray | None = None
        self._placed: dict = {}  # placement -> (the data on the device, its epoch orders)

    def __len__(self) -> int:
        return self._n // self.batch_size if self.drop_last else math.ceil(self._n / self.batch_size)

    @property
    def num_examples(self) -> int:
        return self._n

    @property
    def data(self) -> DataSet:
        """All the examples (the arrays given)."""
        return self._data

    @property
    def position(self) -> int:
        """Examples of the current epoch already handed out."""
        return self._position

    def order(self) -> np.ndarray | None:
        """The current epoch's order of the examples (None: in order)."""
        if self.shuffle and self._order is None:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self._n).astype(np.int32)
        return self._order

    def reset(self) -> None:
        """Starts the next epoch (a new order when shuffling)."""
        if self._position or self._order is not None:
            self.epoch += 1
        self._position = 0
        self._order = None

    def state_dict(self) -> dict:
        """The position to resume from (epoch, cursor) and what it depends on.

        Example:
            >>> import numpy as np
            >>> from jaxws.data import ArrayDataSetIterator
            >>> it = ArrayDataSetIterator(np.arange(10.0), batch_size=4, shuffle=True, seed=1)
            >>> first = next(it).features.tolist()
            >>> again = ArrayDataSetIterator(np.arange(10.0), batch_size=4, shuffle=True, seed=1)
            >>> again.load_state_dict(it.state_dict())
            >>> next(again).features.tolist() == next(it).features.tolist()
            True
        """
        return {"epoch": self.epoch, "position": self._position, "seed": self.seed, "shuffle": self.shuffle,
                "batch_size": self.batch_size, "examples": self._n, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Continues from a ``state_dict()`` of an iterator over the same data.

        Raises:
            ConfigurationError: the state was taken over other data or another batching.
        """
        if not isinstance(state, dict):
            raise ConfigurationError(
                f"ArrayDataSetIterator.load_state_dict(state=<{type(state).__name__}>): expected the "
                "dict that state_dict() returned."
            )
        for key in ("seed", "shuffle", "batch_size", "examples", "drop_last"):
            mine = getattr(self, "_n" if key == "examples" else key)
            if state.get(key) != mine:
                raise ConfigurationError(
                    f"ArrayDataSetIterator.load_state_dict: the state has {key}={state.get(key)!r}, "
                    f"this iterator {mine!r}; resume with an iterator built as the saved one was."
                )
        for key, high in (("epoch", math.inf), ("position", self._n)):
            value = state.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= high:
                raise ConfigurationError(
                    f"ArrayDataSetIterator.load_state_dict: the state has {key}={value!r}, expected "
                    f"{'an int >= 0' if high == math.inf else f'an int in 0..{high}'}; pass the dict that "
                    "state_dict() returned."
                )
        self.epoch = int(state["epoch"])
        self._order = None
        self.seek(state["position"])

    def seek(self, position: int) -> None:
        """Moves the cursor of the current epoch (``fit`` does, after taking batches on the device)."""
        self._position = min(max(0, int(position)), self._n)

    def __next__(self) -> DataSet:
        start = self._position
        stop = min(start + self.batch_size, self._n)
        if start >= self._n or (self.drop_last and stop - start < self.batch_size):
            raise StopIteration
        self._position = stop
        order = self.order()
        index = slice(start, stop) if order is None else order[start:stop]
        if isinstance(self._data.features, jax.Array):  # one dispatch, not an eager gather per leaf
            return _take_rows(self._data, np.arange(start, stop, dtype=np.int32) if order is None else index)
        data = self._data
        if type(data) is DataSet:  # the fields directly: a third of the time of a tree.map
            return DataSet(*[None if a is None else a[index]
                             for a in (data.features, data.labels, data.features_mask, data.labels_mask)])
        return jax.tree.map(lambda a: a[index], data)

    # -- device-resident use (fit) -------------------------------------------------------------

    def fits_on_device(self) -> bool:
        """Whether ``fit`` takes this iterator's batches on the device (see ``resident``)."""
        if self.resident is not None:
            return self.resident
        leaves = jax.tree.leaves(self._data)
        if all(isinstance(a, jax.Array) for a in leaves):
            return True
        limit = _RESIDENT_BYTES
        stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
        if stats and stats.get("bytes_limit"):
            limit = stats["bytes_limit"] // 4
        return sum(int(np.size(a)) * np.dtype(a.dtype).itemsize for a in leaves) <= limit

    def on_device(self, placement: Any) -> tuple[DataSet, Any]:
        """``(data on the device, this epoch's order on the device or None)``, placed once."""
        key = (placement.device, placement.sharding)
        if key not in self._placed:
            self._placed[key] = [placement.place(self._data)[0], None, None]
        entry = self._placed[key]
        order = self.order()
        if order is None:
            return entry[0], None
        if entry[1] != self.epoch:
            entry[1], entry[2] = self.epoch, placement.place(order)[0]
        return entry[0], entry[2]


class ArrayMultiDataSetIterator(ArrayDataSetIterator):
    """Batches of several in-memory input and label arrays, as MultiDataSets.

    Everything ArrayDataSetIterator does (shuffling per epoch, positions to resume from,
    device-resident use by ``fit``), for a ComputationGraph's inputs and outputs.

    Example:
        >>> import numpy as np
        >>> from jaxws.data import ArrayMultiDataSetIterator
        >>> it = ArrayMultiDataSetIterator([np.ones((10, 3)), np.ones((10, 2))], [np.zeros(10)], batch_size=4)
        >>> [len(b.features) for b in it], len(it)
        ([2, 2, 2], 3)
    """

    def __init__(self, features: Any, labels: Any = (), batch_size: int = 32, *, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, features_masks: Any = None, labels_masks: Any = None,
                 resident: bool | None = None):
        data = MultiDataSet(_as_tuple(features), _as_tuple(labels) or (), _as_tuple(features_masks),
                            _as_tuple(labels_masks))
        super().__init__(data.features[0], None, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                         resident=resident)
        for path, a in jax.tree_util.tree_leaves_with_path(data):
            if len(a) != self._n:
                raise ConfigurationError(
                    f"ArrayMultiDataSetIterator: features[0] has {self._n} examples but "
                    f"{jax.tree_util.keystr(path).lstrip('.')} has {len(a)}."
                )
        self._data = data


@jax.jit
def _take_rows(data: DataSet, rows: Any) -> DataSet:
    return jax.tree.map(lambda a: jnp.take(a, rows, axis=0), data)


def refuse_non_source(source: Any, call: str, also: str = "") -> None:
    """ConfigurationError for what cannot be a source of batches (None, a string, a number);
    ``call`` names the argument, e.g. ``"from_iterable(source="``; ``also``: what else the
    call takes, named first in the message."""
    if isinstance(source, (str, bytes)) or not (callable(source) or hasattr(source, "__iter__")):
        raise ConfigurationError(
            f"{call}<{type(source).__name__}>): expected {also}an iterator or iterable of batches (a "
            "DataSetIterator, a list, a generator) or a function that makes one (lambda: my_loader())."
        )


class IterableDataSetIterator(DataSetIterator):
    """Wraps an iterable, or a factory of iterables, that yields batches."""

    def __init__(self, source: Iterable | Callable[[], Iterable]):
        refuse_non_source(source, "from_iterable(source=")
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


class AsyncShieldDataSetIterator(DataSetIterator):
    """A pass-through that forbids async wrapping: ``fit`` never prefetches it (debugging)."""

    async_supported = False

    def __init__(self, base: Any):
        self.base = base if hasattr(base, "__next__") else from_iterable(base)

    def __next__(self):
        return next(self.base)

    def reset(self) -> None:
        self.base.reset()

    @property
    def reset_supported(self) -> bool:
        return getattr(self.base, "reset_supported", True)

    def __len__(self) -> int:
        return len(self.base)


class AsyncShieldMultiDataSetIterator(AsyncShieldDataSetIterator):
    """AsyncShieldDataSetIterator for MultiDataSet iterators."""
