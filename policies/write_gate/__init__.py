from dataclasses import dataclass
from pathlib import Path

import torch

from composable_kv.stages import AdmissionStage, GraphSupport, param, register_stage


@register_stage
@dataclass
class WriteGate(AdmissionStage):
    """Write-Gated KV admission: a small MLP per (layer, KV head) reads a token's pre- and post-RoPE
    key and outputs g in (0, 1). Every token first sits in a ring window of the last `window_tokens`
    tokens (always read); when it leaves the window it is admitted to the global pages of its
    (request, KV head) only if g > `threshold`, else dropped for that head. Dense layers keep every
    token. The selectors and the terminal stage then read window + admitted pages
    (policies/write_gate/admission.py). The gate, the ring window and the page moves are device ops
    of fixed shapes (gated_cache.py), so the decode step is captured in the runtime's CUDA graph."""

    name = "write_gate"
    graph_support = GraphSupport.ALWAYS
    paper = ("Learning What to Write: Write-Gated KV for Efficient Long-Context Inference "
             "(Huang et al., arXiv 2512.17452)")
    summary = "admit a token leaving the local window to the global cache only if its learned gate > threshold"

    threshold: float = param(0.1, "admit a token leaving the window iff g > threshold", min=0.0, max=1.0)
    window_tokens: int = param(256, "ring window of recent tokens, always kept and always read", min=1)
    weights: str = param("", "gate weights (.pt from `ckv train-gate`); '' = the default model's in the "
                             "composable-kv cache (write_gate/<model>.pt)")

    def describe(self) -> str:
        return (f"write_gate: ring window of {self.window_tokens} tokens, admit when g > {self.threshold}; "
                f"head-major gated cache (one page list per layer x request x KV head, read with Hkv=1), "
                f"window pages forced before the first scorer; device-side admission (graph-safe)")

    def build_session(self, pipeline, model, shape, num_pages: int, dtype, device):
        from composable_kv.policies.write_gate.admission import gated_session
        return gated_session(pipeline, model, shape, num_pages, dtype, device)

    def weights_path(self, model_name: str | None = None) -> Path:
        if self.weights:
            return Path(self.weights).expanduser()
        from composable_kv.assets import cache_dir
        return cache_dir() / "write_gate" / f"{model_name or 'default'}.pt"


class GateMLP(torch.nn.Module):
    """One 2-layer MLP per (layer, KV head), batched: x = concat(k_pre, k_post) standardized ->
    g = sigmoid(w2 . gelu(W1 x + b1) + b2)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, hidden: int = 32):
        super().__init__()
        L, H, F = num_layers, num_kv_heads, 2 * head_dim
        self.head_dim, self.hidden = head_dim, hidden
        self.w1 = torch.nn.Parameter(torch.randn(L, H, F, hidden) * F ** -0.5)
        self.b1 = torch.nn.Parameter(torch.zeros(L, H, hidden))
        self.w2 = torch.nn.Parameter(torch.randn(L, H, hidden) * hidden ** -0.5)
        self.b2 = torch.nn.Parameter(torch.zeros(L, H))
        self.register_buffer("mu", torch.zeros(L, H, F))
        self.register_buffer("sigma", torch.ones(L, H, F))

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.w1.shape[0], self.w1.shape[1], self.head_dim

    def logits_all(self, x: torch.Tensor) -> torch.Tensor:
        """x [L, H, N, 2D] -> logits [L, H, N] (training: every gate at once)."""
        x = (x - self.mu[:, :, None]) / self.sigma[:, :, None]
        h = torch.nn.functional.gelu(torch.einsum("lhnf,lhfk->lhnk", x, self.w1) + self.b1[:, :, None])
        return torch.einsum("lhnk,lhk->lhn", h, self.w2) + self.b2[:, :, None]

    def forward(self, layer: int, k_pre: torch.Tensor, k_post: torch.Tensor) -> torch.Tensor:
        """k_pre, k_post [T, H, D] -> g [T, H] fp32."""
        x = torch.cat([k_pre, k_post], dim=-1).float()  # [T, H, 2D]
        x = (x - self.mu[layer]) / self.sigma[layer]
        h = torch.nn.functional.gelu(torch.einsum("thf,hfk->thk", x, self.w1[layer]) + self.b1[layer])
        return torch.sigmoid(torch.einsum("thk,hk->th", h, self.w2[layer]) + self.b2[layer])

    def save(self, path, meta: dict) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": {k: v.detach().cpu() for k, v in self.state_dict().items()}, "meta": dict(meta),
                    "hidden": self.hidden}, path)

    @classmethod
    def load(cls, path, *, num_layers: int, num_kv_heads: int, head_dim: int) -> "GateMLP":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"write_gate: no gate weights at {path}; train them with `ckv train-gate` "
                                    f"(or set the stage's `weights:` to a .pt file it wrote)")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        gate = cls(num_layers, num_kv_heads, head_dim, hidden=int(blob["hidden"]))
        got = tuple(blob["state"]["w1"].shape[:3])
        want = (num_layers, num_kv_heads, 2 * head_dim)
        if got != want:
            raise ValueError(f"write_gate: weights {path} are for [layers, KV heads, 2*head_dim] = {list(got)}, "
                             f"the model has {list(want)}; train them for this model with `ckv train-gate`")
        gate.load_state_dict(blob["state"])
        gate.meta = blob.get("meta", {})
        return gate.eval()
