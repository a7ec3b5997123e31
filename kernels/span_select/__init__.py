"""Ltri's span ballots: which spans each query head's ranking fits into the free budget (reference.py, triton.py)."""
