from dataclasses import dataclass

import torch

from composable_kv.ints import cdiv
from composable_kv.stages import FusedPart, SelectorStage, _inherits, param, register_stage


@register_stage
@dataclass
class SinkWindow(SelectorStage):
    """Force the first `sink_tokens` and the last `window_tokens` tokens' pages.

    Alone it is StreamingLLM's static policy (only those pages are read); before a scoring selector
    its pages are forced and count against that selector's budget.
    """

    name = "sink_window"
    paper = "StreamingLLM: Efficient Streaming Language Models with Attention Sinks (Xiao et al., 2023)"
    summary = "force the sink pages and the recent-window pages"
    sink_tokens: int = param(64, "leading tokens always read (attention sinks)", min=0)
    window_tokens: int = param(256, "most recent tokens always read", min=0)

    def fused_part(self, page_size: int) -> FusedPart | None:
        if not _inherits(self, SinkWindow, "plan_forced", "apply"):
            return None
        return FusedPart(forced_pages=cdiv(self.sink_tokens, page_size) + cdiv(self.window_tokens, page_size) + 1)

    def plan_forced(self, plan) -> torch.Tensor:
        S = plan.page_size
        pos = torch.arange(plan.max_pages, device=plan.page_table.device)[None]  # [1, P]
        sink = pos * S < self.sink_tokens
        window_start = (plan.seq_lens.long() - self.window_tokens).clamp(min=0)[:, None]  # [B, 1]
        window = (pos + 1) * S > window_start
        return (sink | window) & plan.valid  # [B, P]
