"""ltri's span ranking: votes, then best score, descending, ties to the lower span id, in one sort."""
import pytest
import torch

from composable_kv.policies.ltri import spans_by_votes_then_best

pytestmark = pytest.mark.cpu


def two_sorts(votes, best):
    """The ranking as two stable sorts: by best, then by votes."""
    by_best = torch.sort(best, dim=-1, descending=True, stable=True).indices
    by_votes = torch.sort(votes.gather(-1, by_best), dim=-1, descending=True, stable=True).indices
    return by_best.gather(-1, by_votes)


@pytest.mark.parametrize("seed", range(4))
def test_one_sort_ranks_as_two_stable_sorts(seed):
    g = torch.Generator().manual_seed(seed)
    B, H, NS = 3, 4, 257
    votes = torch.randint(0, 9, (B, H, NS), generator=g).float()  # many ties
    best = torch.randn(B, H, NS, generator=g).round(decimals=1)  # ties, negatives, zeros
    best[torch.rand(B, H, NS, generator=g) < 0.1] = float("-inf")  # no span
    best[torch.rand(B, H, NS, generator=g) < 0.05] = -0.0
    best[torch.rand(B, H, NS, generator=g) < 0.05] = float("inf")
    best[..., :3] = torch.tensor([3.0e38, -3.0e38, 1e-42])  # extremes and a subnormal
    got = spans_by_votes_then_best(votes, best)
    assert torch.equal(got, two_sorts(votes, best))
    v, b = votes.gather(-1, got), best.gather(-1, got)  # and the order is what it says, checked directly
    assert ((v[..., :-1] > v[..., 1:]) | ((v[..., :-1] == v[..., 1:]) & (b[..., :-1] >= b[..., 1:]))).all()
