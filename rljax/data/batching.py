"""Host-side batch iteration: shuffling, dropping the last batch, resumable positions.

Part of :mod:`rljax.data` (its docstring has the conventions: NumPy int32 out,
bucketed lengths, deliberate differences from TRL 0.7.11).
"""
from __future__ import annotations

from typing import (
    Any,
    Callable,
    Dict,
    List,
    Optional,
)

import numpy as np


class BatchIterator:
    """Deterministic, resumable minibatches over a ``datasets.Dataset`` or a list.

    Epoch ``e`` visits the examples in ``np.random.default_rng([seed, e])``
    order (or in order when ``shuffle=False``), so the batch at any
    ``position`` is a pure function of ``(seed, position)``. ``position``
    counts batches handed out since the start of training (across epochs):
    save it, and pass it back as ``position=`` to resume exactly.

    Each batch is ``collate_fn(list_of_examples)``, or the list itself.
    With ``drop_last=False`` the last batch of an epoch may be smaller (one
    more compiled shape). Iteration stops after ``num_epochs`` (None: never).
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_epochs: Optional[int] = None,
        collate_fn: Optional[Callable[[List[Any]], Any]] = None,
        position: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.n = len(data)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_epochs = num_epochs
        self.collate_fn = collate_fn
        self.position = int(position)
        full, rest = divmod(self.n, batch_size)
        self.batches_per_epoch = full if (drop_last or rest == 0) else full + 1
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.n} examples give no batch of size {batch_size} with drop_last={drop_last}")
        self._order_cache: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self.position // self.batches_per_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Example indices ``[n]`` for ``epoch``."""
        if epoch not in self._order_cache:
            order = (
                np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
            )
            self._order_cache = {epoch: order}
        return self._order_cache[epoch]

    def indices(self, position: int) -> np.ndarray:
        """Example indices of the batch at global ``position``."""
        epoch, b = divmod(position, self.batches_per_epoch)
        return self.epoch_order(epoch)[b * self.batch_size : (b + 1) * self.batch_size]

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Any:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        examples = [self.data[int(i)] for i in self.indices(self.position)]
        self.position += 1
        return self.collate_fn(examples) if self.collate_fn is not None else examples
