"""AttentionPredictor's pieces: the page-score CNN, its input transform, weights on disk, and the
per-layer history ring buffer of block-pooled attention (one value per page per decode step).

The CNN follows the paper's shape (~5k parameters): the history window [H steps, P pages] is an image;
two 3x3 convolutions (1 -> c1 -> c2 channels, ReLU), a mean over the time axis, and a 1x1 convolution
give one score per page. Convolutions along pages make it independent of the context length.
"""
from __future__ import annotations

import os
import weakref
from pathlib import Path

import torch
from torch import nn

from composable_kv.ints import cdiv
from composable_kv.kernels.predictor_cnn.reference import CNNWeights, cnn_forward, ring_window
from composable_kv.kernels.predictor_cnn.reference import features  # noqa: F401  (the CNN's input; train.py)
from composable_kv.seq_rows import grown, grown_pages

WEIGHTS_NAME = "attention_predictor.pt"
_LOADED: dict[tuple, "PredictorCNN"] = {}
_PACKED: "weakref.WeakKeyDictionary[PredictorCNN, object]" = weakref.WeakKeyDictionary()  # for the Triton kernel


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

    def weights(self) -> CNNWeights:
        return CNNWeights(self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias,
                          self.head.weight, self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H, P] (features of H past steps, oldest first) -> scores [N, P] (higher = read)."""
        return cnn_forward(x, self.weights())


def prefill_page_mass(q: torch.Tensor, k: torch.Tensor, page_size: int, sm_scale: float,
                      last: int) -> torch.Tensor:
    """Block-pooled attention of a prompt's last `last` queries, as decode steps would record it.

    q [Hq, Tq, D] the prompt's last Tq >= h queries, k [Hkv, T, D] (one sequence, real tokens only,
    post-RoPE) -> [Hq, h, P] fp32 with
    h = min(last, T), P = ceil(T / page_size): row i is the exact causal softmax of query T-h+i
    summed per page (each row sums to 1). Costs Hq * h * T dot products, not T^2.
    """
    Hq, Tq, _ = q.shape
    Hkv, T = k.shape[0], k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"prefill_page_mass: {Hq} query heads is not a multiple of {Hkv} KV heads")
    h = min(last, T)
    if Tq < h:
        raise ValueError(f"prefill_page_mass: the last {h} queries are needed, got {Tq}")
    qh = q[:, Tq - h:].float().reshape(Hkv, Hq // Hkv * h, -1)
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


def kernel_weights(model: PredictorCNN):
    """`model`'s weights packed for the fused Triton CNN (kernels/predictor_cnn), once per loaded model."""
    if model not in _PACKED:
        from composable_kv.kernels.predictor_cnn.triton import pack_weights
        _PACKED[model] = pack_weights(model.weights())
    return _PACKED[model]


def history_kernels(device):
    """kernels/page_history for `device`: the Triton launches on CUDA (or TRITON_INTERPRET=1), else torch ops."""
    from composable_kv.kernels import backend_for
    if backend_for(device) == "triton":  # imported only then: Triton reads TRITON_INTERPRET when a kernel is defined
        from composable_kv.kernels.page_history import triton as impl
    else:
        from composable_kv.kernels.page_history import reference as impl
    return impl


class PageHistory:
    """One layer's ring buffers of per-page attention mass, one row per sequence (rows: the stage
    state's SequenceRows), in fixed-shape device tensors updated in place by device ops, so a captured
    decode step reads and writes them without the host:

      hist   [R, Hh, H, Pcap] fp32  mass per (row, head, step slot, page); slot ptr[r] is written next
      scores [R, Hkv, Pcap] fp32    the last predicted scores (run_every > 1); -inf before the first
      ptr    [R] long               the next slot
      steps  [R] long               the calibration clock: decode steps recorded, +1 for a prefill seed
      seeded [R] bool               the row started from the prefill

    Hh is the KV heads (per_kv_head) or the query heads. Capacity (rows, pages) grows by doubling on the
    host from shapes alone; a graph-captured step finds it grown by the eager step before the capture.
    """

    def __init__(self, heads: int, kv_heads: int, steps: int, device):
        self.heads, self.kv_heads, self.H, self.device = heads, kv_heads, steps, device
        self.hist = torch.zeros(0, heads, steps, 0, device=device)
        self.scores = torch.zeros(0, kv_heads, 0, device=device)
        self.ptr = torch.zeros(0, dtype=torch.long, device=device)
        self.steps = torch.zeros(0, dtype=torch.long, device=device)
        self.seeded = torch.zeros(0, dtype=torch.bool, device=device)

    @property
    def page_capacity(self) -> int:
        return self.hist.shape[-1]

    def ensure(self, rows: int, pages: int) -> None:
        """Room for `rows` rows and `pages` pages (new rows start reset, new pages empty)."""
        R, cap = self.hist.shape[0], self.page_capacity
        R2, cap2 = grown(R, rows), grown_pages(cap, pages)
        if cap2 > cap:
            self.hist = torch.nn.functional.pad(self.hist, (0, cap2 - cap))
            self.scores = torch.nn.functional.pad(self.scores, (0, cap2 - cap), value=float("-inf"))
        if R2 > R:
            n = R2 - R
            self.hist = torch.cat([self.hist, self.hist.new_zeros(n, *self.hist.shape[1:])])
            self.scores = torch.cat([self.scores, self.scores.new_full((n, *self.scores.shape[1:]), float("-inf"))])
            self.ptr = torch.cat([self.ptr, self.ptr.new_zeros(n)])
            self.steps = torch.cat([self.steps, self.steps.new_zeros(n)])
            self.seeded = torch.cat([self.seeded, self.seeded.new_zeros(n)])

    def reset(self, row: int) -> None:
        """A new sequence's row: no history, never scored, clock at 0."""
        self.hist[row] = 0
        self.scores[row] = float("-inf")
        self.ptr[row] = 0
        self.steps[row] = 0
        self.seeded[row] = False

    def push(self, rows: torch.Tensor, page_lse: torch.Tensor, lse: torch.Tensor, group: int = 1) -> None:
        """Record one step's page mass, exp(page_lse [B, Hh * group, P] - lse [B, Hh * group]) (0 for pages not
        read; each head's group averaged), into each row's next slot; the clock ticks (kernels/page_history: one
        launch on CUDA, torch ops elsewhere)."""
        history_kernels(page_lse.device).push(self.hist, self.ptr, self.steps, rows, page_lse, lse, group)

    def seed(self, row: int, mass: torch.Tensor) -> None:
        """Fill a row with the prefill's pooled attention: mass [Hh, h, P], oldest first (h <= H).
        Counts as one step of the clock: the prefill read every page."""
        h, P = mass.shape[1:]
        if h > self.H:
            raise ValueError(f"PageHistory.seed: {h} steps for a history of {self.H}")
        self.hist[row] = 0
        self.hist[row, :, :h, :P] = mass.to(self.device)
        self.ptr[row] = h % self.H
        self.steps[row] = 1
        self.seeded[row] = True

    def window(self, rows: torch.Tensor, P: int) -> torch.Tensor:
        """The last H steps of each row, oldest first: [B, Hh, H, P] (zeros before the first step)."""
        return ring_window(self.hist, rows, self.ptr, P)
