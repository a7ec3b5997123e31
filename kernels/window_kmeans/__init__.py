"""k-means representative keys: spans of keys, and the decode window ltri closes (reference.py, triton.py)."""
