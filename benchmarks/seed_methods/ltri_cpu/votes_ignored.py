"""Experiment: ltri ranks spans by best score only (votes ignored), through the eval CLI (CPU: the torch reference
of kernels/span_select)."""
import sys
sys.path.insert(0, '.')
import torch
from composable_kv.kernels.span_select import reference as R
from composable_kv.eval import scale
orig = R.span_votes


def no_votes(*args, **kw):
    votes, best = orig(*args, **kw)
    return torch.zeros_like(votes), best


R.span_votes = no_votes
sys.exit(scale.main(sys.argv[1:]))
