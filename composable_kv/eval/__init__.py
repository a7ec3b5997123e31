"""Evaluation and the demo: tasks (passkey, RULER-style needles, variable tracking, common words,
fidelity), the evaluation loop, `ckv eval` / `ckv demo` (cli) and the evaluation at scale (scale)."""
