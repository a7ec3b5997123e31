"""benchmarks/seed_methods_cost.py --profile: where one layer's time goes, per method."""
import torch

import seed_methods_cost as bench  # benchmarks/ is on the test path


def test_profile_lists_the_layers_ops_with_their_time():
    dev = torch.device("cpu")
    stages = bench.policies(64, "attend", weights=None)["quest"]
    pipe, cache, q = bench.build("quest", stages, "smollm2-135m", 2, 256, dev, torch.float32, "reference")
    pipe.run(q, cache, 0)
    launches, total, events = bench.profile_layer(pipe, cache, q, dev, calls=2, top=5)
    assert 0 < len(events) <= 5 and launches >= len(events) and total > 0
    assert [u for _, _, u in events] == sorted((u for _, _, u in events), reverse=True)  # costliest first
    assert sum(u for _, _, u in events) <= total + 1e-6
    text = bench.profile_table("quest", "attend", (launches, total, events), dev)
    assert text.startswith("### quest (attend): ") and "torch ops (CPU" in text
    assert text.count("\n| `") == len(events)
