"""ByteBudgetLRU: what stays within the budget, in which order values leave, and bad budgets."""

import pytest

from instalign_d2.data.byte_budget_lru import ByteBudgetLRU


def test_the_least_recently_used_values_leave_first_beyond_the_budget():
    kept = ByteBudgetLRU(10)
    kept.put("a", 1, 4)
    kept.put("b", 2, 4)
    assert kept.get("a") == 1  # "b" is now the least recently used
    kept.put("c", 3, 4)
    assert "b" not in kept and kept.get("a") == 1 and kept.get("c") == 3
    assert kept.nbytes == 8 and len(kept) == 2
    kept.put("a", 10, 2)  # replacing a value counts its new size only
    assert kept.get("a") == 10 and kept.nbytes == 6
    kept.put("big", 4, 11)  # larger than the budget: nothing stays
    assert len(kept) == 0 and kept.nbytes == 0 and kept.get("c") is None


def test_keep_at_least_holds_the_newest_values_whatever_their_size():
    kept = ByteBudgetLRU(0, keep_at_least=1)
    kept.put("a", 1, 100)
    assert kept.get("a") == 1
    kept.put("b", 2, 100)
    assert "a" not in kept and kept.get("b") == 2 and kept.nbytes == 100


def test_a_negative_budget_is_refused():
    with pytest.raises(ValueError, match="budget_bytes"):
        ByteBudgetLRU(-1)
