"""Built-in stages, one module each. Importing this package registers them."""
from . import art, attend, key_shadow, quest, sink_window, topk  # noqa: F401
