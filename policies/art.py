
from dataclasses import dataclass

from composable_kv.stages import StopRule, TerminalStage, param, register_stage


@register_stage
@dataclass
class Art(TerminalStage):
    """ART, Attention Run-time Termination: read the selected pages in descending score order and
    stop once more pages would not change the output.

    stop: stability  the paper-style heuristic. After every `chunk_pages` pages, with o_t = acc/l per
                     query head: |(||o_t|| - ||o_{t-1}||)| / ||o_{t-1}|| <= scale_tol and
                     1 - cos(o_t, o_{t-1}) <= direction_tol for every head of the GQA group counts as
                     a stable check; `patience` stable checks in a row stop the read.
    stop: certified  sound: stop once the softmax mass of the unread pages is provably <= delta,
                     from per-page logit upper bounds U_b: sigmoid(LSE_R(U_b + log n_b) - log Z_S) <= delta.
                     Then ||o - o_S|| <= delta * (max_R ||v|| + ||o_S||).
    stop: calibrated a HEURISTIC, not certified: the certified tail corrected by the bound's slack observed on
                     the full pages already read, c = max_{b read} (log sum_{t in b} e^{s_t} - U_b - log n_b)
                     <= 0, per query head; stop once sigmoid(LSE_R(U_b + log n_b) + c - log Z_S) <= delta. The
                     request's last page is read first. It stops no later than the certified stop at the same
                     delta; the unread mass can exceed delta (kernels/paged_decode/README.md).
    calibrate: recent  the calibrated stop's c from the last chunk's full pages only (the pages read just
                     before the unread ones, whose slack resembles theirs), not the max over every page read.
    calibrate: once  c from the first chunk's full pages; the stop point is then set once, before reading on,
                     from the bounds alone: the first chunk end e where LSE_{j >= e}(U_j + log n_j) + c is at most
                     logit(delta) above log Z_first (the first chunk's mass) for every head. The rest reads like
                     a plain list, with no checks (kernels/paged_decode/README.md).
    accumulate: bf16 rounds the running output o = acc/l to bf16 after every chunk (in the reference and
                the Triton kernel): a change below half a bf16 ulp of every element leaves o unchanged,
                so the stability check sees exactly zero change.
    order: natural reads the kept pages in page order (the ART paper stops on FlashAttention's blocks
           in natural order); the certified stop still uses the pages' bounds, in that order.
    """

    name = "art"
    paper = "ART: Attention Run-time Termination (arXiv 2606.00024); certified stop: composable-kv"
    summary = ("read pages best-first, stop early (certified mass bound; or heuristics, not certified: "
               "calibrated mass estimate, stability)")

    stop: str = param("certified", "stop rule: certified (sound), calibrated (heuristic, NOT certified: the bound "
                      "corrected by the slack seen on the pages read), stability (heuristic, NOT certified)",
                      choices=("certified", "calibrated", "stability"))
    delta: float = param(0.01, "certified: bound on the softmax mass left unread; calibrated: the estimate's "
                         "target; in (0, 1)", min=0.0, max=1.0)
    scale_tol: float = param(1e-7, "stability: relative change of ||o|| per check", min=0.0)
    direction_tol: float = param(1e-3, "stability: 1 - cos between successive outputs", min=0.0, max=2.0)
    patience: int = param(5, "stability: stable checks in a row before stopping", min=1)
    chunk_pages: int = param(4, "pages read between two checks", min=1, max=64)
    calibrate: str = param("all", "calibrated: the slack c from every full page read (all), from the last "
                           "chunk's full pages (recent: closer to the unread pages, stops earlier), or from the "
                           "first chunk's, the stop point then set from the bounds (once: no checks after it)",
                           choices=("all", "recent", "once"))
    accumulate: str = param("fp32", "running output between chunks: fp32, or rounded to bf16 after every chunk "
                            "(a bf16 accumulator; small changes round to zero)", choices=("fp32", "bf16"))
    order: str = param("score", "read order: the last scorer's scores (Quest's box bound without one), or "
                       "natural page order (the ART paper's kernel)", choices=("score", "natural"))

    def check(self) -> None:
        if self.stop in ("certified", "calibrated") and not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta: expected 0 < delta < 1 for the {self.stop} stop, got {self.delta}")
        if self.calibrate != "all" and self.stop != "calibrated":
            raise ValueError(f"calibrate: {self.calibrate!r} applies to the calibrated stop only (stop: calibrated), "
                             f"got stop: {self.stop}")
        if self.calibrate == "once" and self.accumulate == "bf16":
            raise ValueError("calibrate: 'once' reads on without checks, so a bf16 running output does not apply "
                             "(accumulate: fp32)")
        if self.chunk_pages & (self.chunk_pages - 1):
            raise ValueError(f"chunk_pages: expected a power of two (1, 2, 4, ... 64), got {self.chunk_pages}")

    @property
    def natural_order(self) -> bool:
        return self.order == "natural"

    def describe(self, device=None) -> str:
        """The stop, on every path, and whether it carries a guarantee."""
        if self.stop == "certified":
            rule = f"certified stop (sound: unread softmax mass <= delta={self.delta})"
        elif self.stop == "calibrated":
            rule = f"calibrated stop (heuristic, NOT certified: estimated unread mass <= delta={self.delta})"
            if self.calibrate == "recent":
                rule = rule[:-1] + ", slack of the last chunk read)"
            elif self.calibrate == "once":
                rule = rule[:-1] + ", slack of the first chunk, stop point then set from the bounds)"
        else:
            rule = (f"stability stop (heuristic, NOT certified: scale_tol={self.scale_tol}, "
                    f"direction_tol={self.direction_tol}, patience={self.patience})")
        acc = ", running output rounded to bf16" if self.accumulate == "bf16" else ""
        when = (f"checked once, after the first {self.chunk_pages} pages of each split"
                if self.stop == "calibrated" and self.calibrate == "once" else f"checked every {self.chunk_pages} pages")
        return f"{rule}, {when}, {self.order} order{acc}"

    def stop_rule(self) -> StopRule:
        return StopRule(kind=self.stop, chunk_pages=self.chunk_pages, scale_tol=self.scale_tol,
                        direction_tol=self.direction_tol, patience=self.patience, delta=self.delta,
                        acc_bf16=self.accumulate == "bf16", calibrate=self.calibrate)

    @staticmethod
    def error_bound(tau_bound, value_norm_max, out_norm):
        """||o - o_S|| <= tau * (max ||v|| + ||o_S||) (the certified stop, kernels/paged_decode/README.md).

        max ||v||: from a cache built with the value_norm summary (no stage reads it, so none keeps it)."""
        return tau_bound * (value_norm_max + out_norm)


