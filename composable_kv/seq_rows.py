"""A row per live sequence, for stage state held in fixed-shape device tables ([rows, ...] per layer).

Rows are assigned on the host from sequence ids (host facts, no device read) and come back as a device
index tensor [B]; the same batch gets the same tensor object every step, so a captured CUDA graph that
indexes the tables with it stays valid. A freed sequence's row is reused by the next new sequence.
"""
from __future__ import annotations

import torch


class SequenceRows:
    def __init__(self):
        self.row_of: dict[int, int] = {}
        self.free: list[int] = []
        self.capacity = 0  # rows handed out so far (tables hold at least this many)
        self._batch: tuple[tuple[int, ...], torch.Tensor] | None = None

    def lookup(self, seq_ids, device) -> tuple[torch.Tensor, list[int]]:
        """(rows [B] long on `device`, rows newly assigned in this call: the caller resets them)."""
        key = tuple(seq_ids)
        if self._batch is not None and self._batch[0] == key and self._batch[1].device == torch.device(device):
            return self._batch[1], []
        fresh = [self.assign(sid)[0] for sid in key if sid not in self.row_of]
        rows = torch.tensor([self.row_of[sid] for sid in key], dtype=torch.long, device=device)
        self._batch = (key, rows)
        return rows, fresh

    def assign(self, seq_id: int) -> tuple[int, bool]:
        """(row of `seq_id`, whether it was assigned now)."""
        row = self.row_of.get(seq_id)
        if row is not None:
            return row, False
        if self.free:
            row = self.free.pop()
        else:
            row = self.capacity
            self.capacity += 1
        self.row_of[seq_id] = row
        if self._batch is not None and seq_id in self._batch[0]:
            self._batch = None
        return row, True

    def release(self, seq_id: int) -> None:
        row = self.row_of.pop(seq_id, None)
        if row is not None:
            self.free.append(row)
            if self._batch is not None and seq_id in self._batch[0]:
                self._batch = None


def grown(n: int, need: int, minimum: int = 4) -> int:
    """A capacity >= need, doubling from n (so tables reallocate O(log) times)."""
    return n if need <= n else max(need, 2 * n, minimum)


def grown_pages(n: int, need: int) -> int:
    """A page capacity >= need with 1/8 headroom (at least 16): a table along the page axis reallocates O(log) times
    and holds at most 1/8 more pages than asked. Doubling held up to twice: a 32k prompt's first decode page took
    ltri's reps from 2,048 to 4,096 slots, 17 GB for 32 layers at B = 16 where 8.6 GB do."""
    return n if need <= n else max(need + need // 8, 16)
