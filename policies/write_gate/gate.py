"""The gate: one small MLP per (layer, KV head) over a token's pre- and post-RoPE key."""
from pathlib import Path

import torch

from composable_kv.kernels.gated_write.gate_weights import GateWeights
from composable_kv.kernels.gated_write.reference import gate_mlp


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

    def layer_weights(self, layer: int) -> GateWeights:
        """The layer's weights as the gated write op reads them (views)."""
        return GateWeights(self.w1[layer], self.b1[layer], self.w2[layer], self.b2[layer], self.mu[layer],
                           self.sigma[layer])

    def forward(self, layer: int, k_pre: torch.Tensor, k_post: torch.Tensor) -> torch.Tensor:
        """k_pre, k_post [T, H, D] -> g [T, H] fp32."""
        return gate_mlp(torch.cat([k_pre, k_post], dim=-1).float(), self.layer_weights(layer))  # x [T, H, 2D]

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
