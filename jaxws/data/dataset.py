"""DataSet and MultiDataSet: features, labels and their masks, as registered pytrees.

They pass through jit, donation and device_put like any pytree; ``merge`` pads
variable-length sequences and builds their masks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from jaxws._internals import ArrayImpl as _ArrayImpl
from jaxws.errors import ConfigurationError
from jaxws.workspace import _TAG

__all__ = ["DataSet", "MultiDataSet"]


def _pad_stack(arrays: Sequence[Any], with_mask: bool):
    """Concatenates along axis 0, padding axis 1 to the longest; mask [n, time] if asked."""
    arrays = [np.asarray(a) for a in arrays]
    if arrays[0].ndim < 2 or len({a.shape[1] for a in arrays}) == 1:
        return np.concatenate(arrays), None
    longest = max(a.shape[1] for a in arrays)
    padded, masks = [], []
    for a in arrays:
        widths = [(0, 0)] * a.ndim
        widths[1] = (0, longest - a.shape[1])
        padded.append(np.pad(a, widths))
        masks.append(np.broadcast_to(np.arange(longest) < a.shape[1], (a.shape[0], longest)))
    return np.concatenate(padded), (np.concatenate(masks).astype(np.float32) if with_mask else None)


def _merge_masks(sets, field: str, data_field: str, built):
    masks = [getattr(s, field) for s in sets]
    if all(m is None for m in masks):
        return built
    longest = max(np.shape(getattr(s, data_field))[1] for s in sets)
    full = []
    for s, m in zip(sets, masks):
        n, t = np.shape(getattr(s, data_field))[:2]
        m = np.ones((n, t), np.float32) if m is None else np.asarray(m, np.float32)
        full.append(np.pad(m, [(0, 0), (0, longest - t)]))
    return np.concatenate(full)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DataSet:
    """Features and labels of a batch, with optional masks (1 = real data).

    Sequences are ``[batch, time, features]``, their masks ``[batch, time]``.

    Example:
        >>> import numpy as np
        >>> from jaxws.data import DataSet
        >>> a = DataSet(np.ones((2, 3, 1)), np.ones((2, 3, 1)))
        >>> b = DataSet(np.ones((1, 5, 1)), np.ones((1, 5, 1)))
        >>> m = DataSet.merge([a, b])
        >>> m.features.shape, m.features_mask.sum(axis=1).tolist()
        ((3, 5, 1), [3.0, 3.0, 5.0])
    """

    features: Any
    labels: Any = None
    features_mask: Any = None
    labels_mask: Any = None

    def __init__(self, features: Any, labels: Any = None, features_mask: Any = None, labels_mask: Any = None):
        # the frozen dataclass's generated __init__ sets each field through object.__setattr__:
        # 0.9 us a DataSet, and every batch an iterator yields makes one; this takes 0.4 us
        fields = self.__dict__
        fields["features"], fields["labels"] = features, labels
        fields["features_mask"], fields["labels_mask"] = features_mask, labels_mask

    @property
    def num_examples(self) -> int:
        shape = getattr(self.features, "shape", None)  # an array's, without np.shape's 1 us (fit(batch) reads it per call)
        return int((np.shape(self.features) if shape is None else shape)[0])

    def detach(self) -> DataSet:
        """An independent copy that outlives every workspace (and async ring)."""
        from jaxws.arrays import detach

        return detach(self)

    def split(self, n: int) -> list[DataSet]:
        """Batches of ``n`` examples each (the last may be smaller)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigurationError(f"DataSet.split(n={n!r}): expected an int >= 1 (examples per batch).")
        total = self.num_examples
        return [jax.tree.map(lambda a, i=i: a[i : i + n], self) for i in range(0, total, n)]

    @staticmethod
    def merge(sets: Sequence[DataSet]) -> DataSet:
        """One DataSet of all ``sets``; sequences of different lengths are padded, with masks."""
        sets = list(sets)
        if not sets:
            raise ConfigurationError("DataSet.merge([]): nothing to merge.")
        features, fmask = _pad_stack([s.features for s in sets], True)
        labels, lmask = (None, None) if sets[0].labels is None else _pad_stack([s.labels for s in sets], True)
        fmask = _merge_masks(sets, "features_mask", "features", fmask)
        if labels is not None:
            lmask = _merge_masks(sets, "labels_mask", "labels", lmask)
        return DataSet(features, labels, fmask, lmask)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MultiDataSet:
    """Several feature and label arrays (and masks) of one batch."""

    features: tuple
    labels: tuple = ()
    features_masks: Any = None
    labels_masks: Any = None

    def __init__(self, features: tuple, labels: tuple = (), features_masks: Any = None, labels_masks: Any = None):
        fields = self.__dict__  # as DataSet's: half the cost of the frozen dataclass's __init__
        fields["features"], fields["labels"] = features, labels
        fields["features_masks"], fields["labels_masks"] = features_masks, labels_masks

    @property
    def num_examples(self) -> int:
        return int(np.shape(self.features[0])[0])

    def detach(self) -> MultiDataSet:
        from jaxws.arrays import detach

        return detach(self)

    def split(self, n: int) -> list[MultiDataSet]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigurationError(f"MultiDataSet.split(n={n!r}): expected an int >= 1.")
        return [jax.tree.map(lambda a, i=i: a[i : i + n], self) for i in range(0, self.num_examples, n)]


def signature(ds: Any) -> tuple:
    """A batch's structure, shapes and dtypes (avals, cached on device arrays): the key of
    its program. A DataSet of arrays has its read from its four fields, without a flatten."""
    if type(ds) is DataSet:
        key = []
        for x in (ds.features, ds.labels, ds.features_mask, ds.labels_mask):
            if x is None:
                key.append(None)
            elif type(x) is _ArrayImpl or isinstance(x, jax.Array):  # the exact type first: 0.08 us, not 0.37
                key.append(x.aval)
            elif isinstance(x, np.ndarray):
                key.append((x.shape, x.dtype))
            else:  # a field still a list or a tuple of arrays (before collation)
                break
        else:
            return tuple(key)
    leaves, treedef = jax.tree.flatten(ds)
    return treedef, tuple([x.aval if isinstance(x, jax.Array) else (np.shape(x), x.dtype) for x in leaves])


class Judged(NamedTuple):
    """The :func:`signature` of a host batch whose label values the feed's check judged
    (the model's ``labels_in_range``) before placing it: its step need not count them
    again on the device (``Feed.signed``)."""

    key: tuple


class Rows(NamedTuple):
    """``count`` batches of ``size`` examples of device-resident ``data``, taken inside the
    program from position ``start`` of ``order`` (None: in order). ``judged``: the data's
    label values were checked on the host before it was placed (host arrays)."""

    data: Any
    order: Any
    start: int
    count: int
    size: int
    judged: bool = False

    @property
    def examples(self) -> int:
        """Examples in all ``count`` batches."""
        return self.count * self.size


class Steps(NamedTuple):
    """k device batches of one signature, used where they lie: the program that runs them
    stacks them (``[k, batch, ...]``) inside, so no stacked copy is made before it runs."""

    batches: tuple

    @property
    def count(self) -> int:
        return len(self.batches)

    @property
    def examples(self) -> int:
        """Examples in all k batches (they share one signature, so one batch's rows times k)."""
        return len(self.batches) * self.batches[0].num_examples


def _host_key(ds: Any) -> tuple | None:
    """A DataSet of numpy arrays' :func:`signature` (exact ``np.ndarray`` fields, or None),
    else None: a batch with nothing that can be dead or needs converting, so once its
    signature's shapes are checked only its label values are left to judge."""
    if type(ds) is not DataSet:
        return None
    key = []
    for x in (ds.features, ds.labels, ds.features_mask, ds.labels_mask):
        if x is None:
            key.append(None)
        elif type(x) is np.ndarray:
            key.append((x.shape, x.dtype))
        else:
            return None
    return tuple(key)


def _device_key(ds: Any) -> tuple | None:
    """A batch's :func:`signature` if all its arrays are device arrays attached to no
    workspace, else None. An unmasked DataSet of two device arrays, the usual batch, is
    keyed without the loop over its four fields, at half its cost (the feed's check of
    ``fit(list)`` runs this per batch before any step, the async ring per device batch)."""
    if type(ds) is DataSet:
        x, y = ds.features, ds.labels
        if (ds.features_mask is None and ds.labels_mask is None and type(x) is _ArrayImpl
                and type(y) is _ArrayImpl):
            if getattr(x, _TAG, None) is None and getattr(y, _TAG, None) is None:
                return (x.aval, y.aval, None, None)
            return None
        key = []
        for x in (ds.features, ds.labels, ds.features_mask, ds.labels_mask):
            if x is None:
                key.append(None)
            elif type(x) is _ArrayImpl and getattr(x, _TAG, None) is None:
                key.append(x.aval)
            else:
                return None
        return tuple(key)
    if type(ds) is MultiDataSet:
        for x in jax.tree.leaves(ds):
            if type(x) is not _ArrayImpl or getattr(x, _TAG, None) is not None:
                return None
        return signature(ds)
    return None
