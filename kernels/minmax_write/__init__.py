"""The Quest key min/max summaries of the pages a batch of tokens was written to, from vLLM's slot mapping
(reference.py, triton.py)."""
