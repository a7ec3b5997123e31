"""Low-bit per-token key shadow: quantize pages on append, score pages by a sound logit bound."""
