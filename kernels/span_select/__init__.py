"""Ltri's selection of a layer: ballots, span keys, budget and read order in one launch (reference.py, triton.py)."""
