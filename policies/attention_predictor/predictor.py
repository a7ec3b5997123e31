"""AttentionPredictor's pieces: the page-score CNN, its input transform, weights on disk, and the
per-layer history ring buffer of block-pooled attention (one value per page per decode step).

The CNN follows the paper's shape (~5k parameters): the history window [H steps, P pages] is an image;
two 3x3 convolutions (1 -> c1 -> c2 channels, ReLU), a mean over the time axis, and a 1x1 convolution
give one score per page. Convolutions along pages make it independent of the context length.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from composable_kv.ints import cdiv

WEIGHTS_NAME = "attention_predictor.pt"
_LOADED: dict[tuple, "PredictorCNN"] = {}


def default_weights_path() -> Path:
    """Where `ckv train-predictor` writes and the stage reads by default (a user cache, not the repo);
    $CKV_PREDICTOR_WEIGHTS overrides it."""
    if os.environ.get("CKV_PREDICTOR_WEIGHTS"):
        return Path(os.environ["CKV_PREDICTOR_WEIGHTS"]).expanduser()
    from composable_kv.assets import cache_dir
    return cache_dir() / "predictor" / WEIGHTS_NAME


class PredictorCNN(nn.Module):
    def __init__(self, c1: int = 16, c2: int = 32):
        super().__init__()
        self.c1, self.c2 = c1, c2
        self.conv1 = nn.Conv2d(1, c1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.head = nn.Conv1d(c2, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H, P] (features of H past steps, oldest first) -> scores [N, P] (higher = read)."""
        y = torch.relu(self.conv1(x[:, None]))
        y = torch.relu(self.conv2(y))  # [N, c2, H, P]
        return self.head(y.mean(dim=2))[:, 0]


def features(mass: torch.Tensor, num_pages: torch.Tensor) -> torch.Tensor:
    """History masses [N, H, P] -> CNN input: log1p(mass * pages), so a uniform row is log 2 whatever
    the context length and an unread page stays 0. num_pages: [N] (broadcast over H and P)."""
    return torch.log1p(mass * num_pages.to(mass.dtype).view(-1, 1, 1))


def prefill_page_mass(q: torch.Tensor, k: torch.Tensor, page_size: int, sm_scale: float,
                      last: int) -> torch.Tensor:
    """Block-pooled attention of a prompt's last `last` queries, as decode steps would record it.

    q [Hq, T, D], k [Hkv, T, D] (one sequence, real tokens only, post-RoPE) -> [Hq, h, P] fp32 with
    h = min(last, T), P = ceil(T / page_size): row i is the exact causal softmax of query T-h+i
    summed per page (each row sums to 1). Costs Hq * h * T dot products, not T^2.
    """
    Hq, T, _ = q.shape
    Hkv = k.shape[0]
    if Hq % Hkv:
        raise ValueError(f"prefill_page_mass: {Hq} query heads is not a multiple of {Hkv} KV heads")
    h = min(last, T)
    qh = q[:, T - h:].float().reshape(Hkv, Hq // Hkv * h, -1)
    logits = (qh @ k.float().transpose(1, 2)).view(Hq, h, T) * sm_scale  # [Hq, h, T]
    causal = torch.arange(T, device=q.device)[None] > torch.arange(T - h, T, device=q.device)[:, None]
    probs = logits.masked_fill(causal, float("-inf")).softmax(-1)
    P = cdiv(T, page_size)
    probs = torch.nn.functional.pad(probs, (0, P * page_size - T))
    return probs.view(Hq, h, P, page_size).sum(-1)


def save_weights(model: PredictorCNN, path: str | os.PathLike, meta: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"c1": model.c1, "c2": model.c2, "state_dict": model.state_dict(), "meta": meta or {}}, path)
    return path


def load_weights(path: str | os.PathLike | None, device=None) -> PredictorCNN:
    """The CNN saved at `path` (default: default_weights_path()), cached per (path, mtime, device)."""
    path = Path(path).expanduser() if path else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"attention_predictor: no weights at {path}; train them with "
                                f"`ckv train-predictor` (CPU, a few minutes) or set the stage's `weights`")
    key = (str(path), path.stat().st_mtime_ns, str(device))
    if key not in _LOADED:
        d = torch.load(path, map_location="cpu", weights_only=True)
        model = PredictorCNN(d["c1"], d["c2"])
        model.load_state_dict(d["state_dict"])
        _LOADED[key] = model.eval().to(device or "cpu")
    return _LOADED[key]


class PageHistory:
    """Ring buffer of per-page attention mass for one layer: one row per live sequence.

    hist [R, Hh, H, Pcap] fp32 (Hh = KV heads or query heads), slot `ptr[r]` is written next; a
    sequence gets a zeroed row on its first step and loses it when the cache no longer holds it (or
    when its length goes backwards: a new sequence that reuses the id). `steps[r]` is the row's
    calibration clock: decode steps recorded, plus one when `seed` filled it from the prefill (a dense
    step itself). Capacity (rows, pages) grows by doubling.
    """

    def __init__(self, heads: int, steps: int, device):
        self.heads, self.H, self.device = heads, steps, device
        self.hist = torch.zeros(0, heads, steps, 0, device=device)
        self.scores = torch.zeros(0, heads, 0, device=device)  # last predicted scores (run_every > 1)
        self.ptr = torch.zeros(0, dtype=torch.long, device=device)
        self.steps = torch.zeros(0, dtype=torch.long)  # host copy: drives calibration / run_every
        self.seeded = torch.zeros(0, dtype=torch.bool)  # host: the row started from the prefill
        self.last_len: list[int] = []
        self.row_of: dict[int, int] = {}
        self.free_rows: list[int] = []

    @property
    def page_capacity(self) -> int:
        return self.hist.shape[-1]

    def rows(self, seq_ids, seq_lens: list[int], live) -> torch.Tensor:
        """Row per sequence of the batch ([B] long); frees rows of sequences not in `live`."""
        live = set(live)
        for sid in [s for s in self.row_of if s not in live]:
            self.free_rows.append(self.row_of.pop(sid))
        out = []
        for sid, n in zip(seq_ids, seq_lens):
            r = self.row_of.get(sid)
            if r is not None and n < self.last_len[r]:
                self.free_rows.append(self.row_of.pop(sid))
                r = None
            if r is None:
                r = self._new_row()
                self.row_of[sid] = r
            self.last_len[r] = n
            out.append(r)
        return torch.tensor(out, dtype=torch.long, device=self.device)

    def _new_row(self) -> int:
        if not self.free_rows:
            R = self.hist.shape[0]
            grow = max(4, R)
            self.hist = torch.cat([self.hist, self.hist.new_zeros(grow, *self.hist.shape[1:])])
            self.scores = torch.cat([self.scores, self.scores.new_zeros(grow, *self.scores.shape[1:])])
            self.ptr = torch.cat([self.ptr, self.ptr.new_zeros(grow)])
            self.steps = torch.cat([self.steps, self.steps.new_zeros(grow)])
            self.seeded = torch.cat([self.seeded, self.seeded.new_zeros(grow)])
            self.last_len += [0] * grow
            self.free_rows = list(range(R + grow - 1, R - 1, -1))
        r = self.free_rows.pop()
        self.hist[r] = 0
        self.scores[r] = float("-inf")
        self.ptr[r] = 0
        self.steps[r] = 0
        self.seeded[r] = False
        return r

    def ensure_pages(self, P: int) -> None:
        cap = self.page_capacity
        if P <= cap:
            return
        new = max(P, 2 * cap, 16)
        self.hist = torch.nn.functional.pad(self.hist, (0, new - cap))
        self.scores = torch.nn.functional.pad(self.scores, (0, new - cap), value=float("-inf"))

    def push(self, rows: torch.Tensor, mass: torch.Tensor) -> None:
        """Record one step: mass [B, Hh, P] (0 for pages not read) into each row's next slot."""
        P = mass.shape[-1]
        self.ensure_pages(P)
        slot = self.ptr[rows]  # [B]
        row = torch.zeros(mass.shape[0], self.heads, self.page_capacity, device=self.device)
        row[..., :P] = mass
        self.hist[rows, :, slot] = row
        self.ptr[rows] = (slot + 1) % self.H
        self.steps[rows.cpu()] += 1

    def seed(self, row: int, mass: torch.Tensor) -> None:
        """Fill a fresh row with the prefill's pooled attention: mass [Hh, h, P], oldest first (h <= H).
        Counts as one step of the clock: the prefill read every page."""
        h, P = mass.shape[1:]
        if h > self.H:
            raise ValueError(f"PageHistory.seed: {h} steps for a history of {self.H}")
        self.ensure_pages(P)
        self.hist[row] = 0
        self.hist[row, :, :h, :P] = mass.to(self.device)
        self.ptr[row] = h % self.H
        self.steps[row] = 1
        self.seeded[row] = True

    def window(self, rows: torch.Tensor, P: int) -> torch.Tensor:
        """The last H steps of each row, oldest first: [B, Hh, H, P] (zeros before the first step)."""
        self.ensure_pages(P)
        idx = (self.ptr[rows, None] + torch.arange(self.H, device=self.device)) % self.H  # [B, H]
        h = self.hist[rows][..., :P]  # [B, Hh, H, P]
        return h.gather(2, idx[:, None, :, None].expand_as(h))
