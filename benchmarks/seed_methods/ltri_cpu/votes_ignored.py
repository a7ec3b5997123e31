"""Experiment: ltri ranks spans by best score only (votes ignored), through the eval CLI."""
import sys
sys.path.insert(0, '.')
import torch
import composable_kv.policies.ltri as L
from composable_kv.eval import scale
orig = L.spans_by_votes_then_best
L.spans_by_votes_then_best = lambda votes, best: orig(torch.zeros_like(votes), best)
sys.exit(scale.main(sys.argv[1:]))
