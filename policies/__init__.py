"""Built-in stages, one module each. Importing this package registers them."""
from . import art, attend, quest, sink_window, topk  # noqa: F401
