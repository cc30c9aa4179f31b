"""Datasets (MNIST, CIFAR-10) as normalised tensors, and their label-based partitioning among clients.

Shared by the ClientApp and the ServerApp. Two modules, re-exported here:

- :mod:`~fedsqueeze.data.loading`: finding, reading and normalising a dataset (``load_dataset``);
- :mod:`~fedsqueeze.data.partitioning`: splitting its training samples among clients
  (``partition``, ``holdout_split``, ``client_indices``, ``client_data``).
"""

from __future__ import annotations

from fedsqueeze.data.loading import (
    DATA_ENV_VAR,
    DATASET_NAMES,
    Dataset,
    clear_dataset_cache,
    default_cache_dir,
    load_dataset,
    normalisation,
)
from fedsqueeze.data.partitioning import (
    PARTITIONERS,
    clear_partition_cache,
    client_data,
    client_data_of_run,
    client_indices,
    holdout_split,
    partition,
)

__all__ = [
    "DATA_ENV_VAR",
    "DATASET_NAMES",
    "PARTITIONERS",
    "Dataset",
    "load_dataset",
    "partition",
    "client_data",
    "client_data_of_run",
    "client_indices",
    "clear_caches",
    "default_cache_dir",
    "holdout_split",
    "normalisation",
]


def clear_caches(*, datasets: bool = True, partitions: bool = True) -> None:
    """Forget datasets and/or partitions cached in this process (mainly for tests).

    Parameters
    ----------
    datasets : bool
        Forget the loaded datasets (default: True).
    partitions : bool
        Forget the computed partitions (default: True).
    """
    if datasets:
        clear_dataset_cache()
    if partitions:
        clear_partition_cache()
