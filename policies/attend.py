from dataclasses import dataclass

from composable_kv.stages import TerminalStage, register_stage


@register_stage
@dataclass
class Attend(TerminalStage):
    """Read every page the selectors kept (dense paged decode when there are no selectors)."""

    name = "attend"
    paper = "FlashInfer-style paged decode (Ye et al., 2025)"
    summary = "read every selected page"
