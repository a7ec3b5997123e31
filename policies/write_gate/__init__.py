from dataclasses import dataclass
from pathlib import Path

from composable_kv.policies.write_gate.gate import GateMLP  # noqa: F401 (the trained gate: ckv train-gate)
from composable_kv.stages import AdmissionStage, GraphSupport, param, register_stage


@register_stage
@dataclass
class WriteGate(AdmissionStage):
    """Write-Gated KV admission: a small MLP per (layer, KV head) reads a token's pre- and post-RoPE
    key and outputs g in (0, 1). Every token first sits in a ring window of the last `window_tokens`
    tokens (always read); when it leaves the window it is admitted to the global pages of its
    (request, KV head) only if g > `threshold`, else dropped for that head. Dense layers keep every
    token. The selectors and the terminal stage then read window + admitted pages
    (policies/write_gate/admission.py). A decode token's gate, ring window, page moves and page summaries
    are one op a layer (kernels/gated_write: one Triton kernel, or its fixed-shape torch reference), so
    the decode step is captured in the runtime's CUDA graph."""

    name = "write_gate"
    graph_support = GraphSupport.ALWAYS
    paper = ("Learning What to Write: Write-Gated KV for Efficient Long-Context Inference "
             "(Huang et al., arXiv 2512.17452)")
    summary = "admit a token leaving the local window to the global cache only if its learned gate > threshold"

    threshold: float = param(0.1, "admit a token leaving the window iff g > threshold", min=0.0, max=1.0)
    window_tokens: int = param(256, "ring window of recent tokens, always kept and always read", min=1)
    weights: str = param("", "gate weights (.pt from `ckv train-gate`); '' = the default model's in the "
                             "composable-kv cache (write_gate/<model>.pt)")

    def describe(self, device=None) -> str:
        return (f"write_gate: ring window of {self.window_tokens} tokens, admit when g > {self.threshold}; "
                f"head-major gated cache (one page list per layer x request x KV head, read with Hkv=1), "
                f"window pages forced before the first scorer; device-side admission (graph-safe)")

    def build_session(self, pipeline, model, shape, num_pages: int, dtype, device):
        from composable_kv.policies.write_gate.admission import gated_session
        return gated_session(pipeline, model, shape, num_pages, dtype, device)

    def trained_weights(self, model_name: str) -> tuple[Path, str]:
        return self.weights_path(model_name), "ckv train-gate --model MODEL"

    def weights_path(self, model_name: str | None = None) -> Path:
        if self.weights:
            return Path(self.weights).expanduser()
        from composable_kv.assets import cache_dir
        return cache_dir() / "write_gate" / f"{model_name or 'default'}.pt"

