"""Data: DataSet and MultiDataSet pytrees, base iterators, async prefetch."""

from jaxws.data.dataset import DataSet
from jaxws.data.dataset import MultiDataSet

__all__ = [
    "DataSet",
    "MultiDataSet",
]
