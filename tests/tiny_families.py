"""Tiny random models of the fused decoder's families (Llama, Mistral, Qwen2) for decode tests; no download.

All share 3 layers, 4 q / 2 KV heads of 16, vocab 96, so one gate or one policy fits each."""
import torch

from helpers import tiny_llama

FAMILIES = ("llama", "mistral", "qwen2")


def tiny_family(name: str, window: int = 12):
    """Llama (full attention), Mistral (every layer windowed) or Qwen2 (q/k/v biases; layers >= 1 windowed),
    with sliding windows of `window` tokens."""
    import transformers as tr
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.2,
                  eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    if name == "llama":
        return tiny_llama(256)
    if name == "mistral":
        return tr.MistralForCausalLM(tr.MistralConfig(sliding_window=window, **common)).eval()
    if name == "qwen2":
        return tr.Qwen2ForCausalLM(tr.Qwen2Config(use_sliding_window=True, sliding_window=window,
                                                  max_window_layers=1, **common)).eval()
    raise ValueError(f"tiny_family: expected one of {list(FAMILIES)}, got {name!r}")
