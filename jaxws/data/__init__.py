"""Data: DataSet and MultiDataSet pytrees, base iterators, async prefetch into a device ring."""

from jaxws.data.dataset import DataSet
from jaxws.data.dataset import MultiDataSet
from jaxws.data.iterators import ArrayDataSetIterator
from jaxws.data.iterators import ArrayMultiDataSetIterator
from jaxws.data.iterators import AsyncShieldDataSetIterator
from jaxws.data.iterators import AsyncShieldMultiDataSetIterator
from jaxws.data.iterators import DataSetIterator
from jaxws.data.iterators import IterableDataSetIterator
from jaxws.data.iterators import as_dataset
from jaxws.data.iterators import as_multi_dataset
from jaxws.data.iterators import from_iterable
from jaxws.data.prefetch import AsyncDataSetIterator
from jaxws.data.prefetch import AsyncMultiDataSetIterator

__all__ = [
    "ArrayDataSetIterator",
    "ArrayMultiDataSetIterator",
    "AsyncDataSetIterator",
    "AsyncMultiDataSetIterator",
    "AsyncShieldDataSetIterator",
    "AsyncShieldMultiDataSetIterator",
    "DataSet",
    "DataSetIterator",
    "IterableDataSetIterator",
    "MultiDataSet",
    "as_dataset",
    "as_multi_dataset",
    "from_iterable",
]
