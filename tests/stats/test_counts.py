import pytest
import torch

from advinterp.errors import UserError
from advinterp.stats.counts import Counts


def test_counts_add_merge_and_round_trip():
    a, b = Counts(3), Counts(3)
    a.add(torch.tensor([1, 0, 2]), 4)
    a.add([0, 5, 1], 6)
    b.add(torch.tensor([2, 2, 2]), 3)
    a.merge(b)
    assert a.counts.tolist() == [3, 7, 5] and a.count == 13
    c = Counts(3)
    c.set_state_dict(a.state_dict())
    assert c.counts.tolist() == [3, 7, 5] and c.count == 13
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(Counts(2))
    with pytest.raises(UserError, match="another pass"):
        Counts(2).set_state_dict(a.state_dict())
