"""Built-in stages, one module each. Importing this package registers them."""
from . import art, attend, attention_predictor, key_shadow, ltri, quest, sink_window, snapkv, topk  # noqa: F401
from . import write_gate  # noqa: F401,E402
