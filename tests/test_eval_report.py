"""Reporting of evaluation rows: Wilson intervals, the answers table, non-overlapping plot labels."""

import pytest

from composable_kv.eval import evaluate

pytestmark = pytest.mark.cpu


def test_wilson_interval_known_values():
    lo, hi = evaluate.wilson_interval(0.5, 50)
    assert lo == pytest.approx(0.3664, abs=1e-4) and hi == pytest.approx(0.6336, abs=1e-4)
    lo, hi = evaluate.wilson_interval(1.0, 50)
    assert lo == pytest.approx(0.9287, abs=1e-4) and hi == 1.0
    lo, hi = evaluate.wilson_interval(0.0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert all(x != x for x in evaluate.wilson_interval(0.5, 0))  # nan: no samples


def test_answers_table_puts_outputs_next_to_the_expected_answers():
    def row(policy, outputs):
        return evaluate.EvalRow(policy, "passkey", 4096, len(outputs), accuracy=0.5, outputs=outputs)
    rows = [row("dense", [{"depth": 0.1, "expected": ["12345"], "output": " 12345. Remember", "score": 1.0},
                          {"depth": 0.9, "expected": ["67890"], "output": "the | key\nis", "score": 0.0}]),
            row("quest", [{"depth": 0.1, "expected": ["12345"], "output": "12345", "score": 1.0},
                          {"depth": 0.9, "expected": ["67890"], "output": "67890", "score": 1.0}]),
            evaluate.EvalRow("dense", "fidelity", 4096, 1, kl_vs_dense=0.0)]
    lines = evaluate.answers_table(rows).splitlines()
    assert lines[0] == "| task | ctx | depth | expected | dense | quest |" and len(lines) == 4
    assert lines[2] == "| passkey | 4096 | 0.1 | 12345 | ✓ 12345. Remember | ✓ 12345 |"
    assert lines[3] == "| passkey | 4096 | 0.9 | 67890 | ✗ the / key is | ✓ 67890 |"


def test_plot_labels_never_overlap(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [10 + 0.3 * i for i in range(12)]  # a tight cluster, as policies with similar bytes give
    ys = [0.9 + 0.005 * (i % 3) for i in range(12)]
    ax.plot(xs, ys, "o")
    ax.set_xlim(0, 30)
    ax.set_ylim(0, 1.05)
    anns, left_out = evaluate.place_labels(ax, xs, ys, [f"policy-{i}" for i in range(12)])
    assert left_out == [] and len(anns) == 12
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    from matplotlib.text import Text
    boxes = [Text.get_window_extent(a, renderer) for a in anns]  # the text, without its leader line
    inside = ax.get_window_extent(renderer)
    assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 and inside.y0 <= b.y0 and b.y1 <= inside.y1 for b in boxes)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)
    plt.close(fig)
