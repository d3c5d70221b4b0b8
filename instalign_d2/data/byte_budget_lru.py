"""A least-recently-used store with a budget in bytes, for what the mapper keeps between epochs."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable, Optional, Tuple

__all__ = ["ByteBudgetLRU"]


class ByteBudgetLRU:
    """Values kept up to ``budget_bytes``; beyond it the least recently used go first.

    The caller states each value's size, so one store can hold tensors, arrays and tuples of them.
    ``keep_at_least`` values stay whatever their size: the mapper's last image must stay even
    without a budget, so that the expressions of one image share one tensor.
    """

    def __init__(self, budget_bytes: int, keep_at_least: int = 0):
        if budget_bytes < 0 or keep_at_least < 0:
            raise ValueError(
                f"ByteBudgetLRU: budget_bytes and keep_at_least must be >= 0, got {budget_bytes} "
                f"and {keep_at_least}"
            )
        self.budget_bytes = int(budget_bytes)
        self.keep_at_least = int(keep_at_least)
        self.nbytes = 0
        self._values: "OrderedDict[Hashable, Tuple[Any, int]]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._values

    def get(self, key: Hashable) -> Optional[Any]:
        """The value kept under ``key`` (now the most recently used), or None."""
        entry = self._values.get(key)
        if entry is None:
            return None
        self._values.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        """Keep ``value`` as the most recently used, then drop the oldest beyond the budget."""
        if key in self._values:
            self.nbytes -= self._values.pop(key)[1]
        self._values[key] = (value, int(nbytes))
        self.nbytes += int(nbytes)
        while len(self._values) > self.keep_at_least and self.nbytes > self.budget_bytes:
            _, (_, dropped) = self._values.popitem(last=False)
            self.nbytes -= dropped
