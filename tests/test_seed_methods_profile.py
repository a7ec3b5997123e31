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


def test_a_row_is_timed_over_a_whole_cycle_of_the_stages_clock():
    """The CNN's turns (run_every) and the dense calibration steps (calibrate_every) count in a row's time:
    its graph holds the least common multiple of the two periods."""
    import composable_kv as ckv
    want = {"quest": 1, "ltri": 1, "attention_predictor": 5, "attention_predictor-cheap": 20,
            "attention_predictor-lean": 40, "attention_predictor-fast": 32, "ltri-r2": 1,
            "ltri-bf16": 1}
    pipes = {name: ckv.compile({"name": name, "page_size": 16, "stages": stages}, backend="reference")
             for name, stages in bench.policies(64, "attend", weights="unused.pt").items()}
    assert {name: bench.cycle_steps(pipe) for name, pipe in pipes.items()} == want
    pipe = pipes["attention_predictor"]
    pipe.selectors[0].calibrate_every = 10 ** 9  # the `predict` row: no calibration step
    pipe.selectors[0].run_every = 3
    assert bench.cycle_steps(pipe) == 3
