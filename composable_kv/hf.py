"""Hugging Face integration: decode any Llama/Mistral/Qwen2-family model through a policy.

How it hooks in (transformers >= 5): we register an attention function under the name
``composable_kv`` with ``AttentionInterface`` and switch the model to it for the duration of a
call. Each attention layer then hands us its post-RoPE ``q, k, v`` (``[B, H, T, D]``) together with
``module.layer_idx``. The model runs with ``use_cache=False`` and explicit ``position_ids``, so HF
keeps no ``DynamicCache`` of its own and builds no mask (a custom attention name has no mask
function): our :class:`~composable_kv.PagedKVCache` is the only KV store.

* Prefill is dense: causal ``scaled_dot_product_attention`` over the (left-padded) batch, with a
  key-padding mask when prompts differ in length; the real tokens' K/V are written to the paged
  cache (which updates the page summaries the policy needs).
* Decode: per step we ``reserve`` one slot per sequence and ``plan`` once; in each layer the new
  token's K/V is written and the compiled pipeline's ``run`` produces the attention output. The
  pipeline itself treats its ``dense_layers`` densely.

Entry points: :func:`generate` (greedy decoding of a batch of prompts) and :class:`PolicySession`
(prefill / decode / teacher-forced steps, used by the evaluation tasks).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .contracts import check_int, check_token_ids
from .errors import CkvError

__all__ = [
    "ATTN_IMPLEMENTATION",
    "ContextTooLongError",
    "GenerationOutput",
    "ModelShape",
    "PolicySession",
    "PrefillCache",
    "StepStats",
    "UnsupportedModelError",
    "check_model_features",
    "compile_policy",
    "dense_logits",
    "generate",
    "teacher_forced_logits",
]

ATTN_IMPLEMENTATION = "composable_kv"
DEFAULT_POLICY = "configs/quest_art.yaml"
PREFILL_TOKENS = 65536  # prefill runs equal-length prompts in batches of at most this many tokens
PREFILL_QUERY_TAIL = 64  # a recorded prefill keeps each prompt's last 64 queries per layer (Stage.prefill_queries)
EOS_CHECK_EVERY = 8  # generate() asks the device whether any sequence still runs this often

_ACTIVE_SESSION: contextvars.ContextVar["PolicySession | None"] = contextvars.ContextVar(
    "composable_kv_active_session", default=None)


class ContextTooLongError(CkvError, ValueError):
    """Prompt plus generated tokens exceed the model's maximum context."""


class UnsupportedModelError(CkvError, ValueError):
    """The model's attention has a feature composable_kv does not implement (soft-capping, sinks, ...)."""


# --------------------------------------------------------------------------------------------
# Model shape and policy compilation
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int | None

    @classmethod
    def of(cls, model) -> "ModelShape":
        cfg = model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        n_q = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
        return cls(
            num_layers=cfg.num_hidden_layers,
            num_q_heads=n_q,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_q,
            head_dim=head_dim,
            max_positions=getattr(cfg, "max_position_embeddings", None),
        )


def compile_policy(policy):
    """A compiled ``DecodePipeline`` from a YAML path, a dict, or an already compiled pipeline."""
    import composable_kv as ckv

    if isinstance(policy, ckv.DecodePipeline):
        return policy
    if isinstance(policy, (str, Path)):
        return ckv.compile(policy)  # a path, or a shipped config's name (config.resolve_policy_path)
    if isinstance(policy, dict):
        return ckv.compile(policy)
    raise TypeError(f"policy must be a YAML path, a dict or a compiled DecodePipeline, not {type(policy).__name__}")


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _composable_kv_attention)


def _composable_kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry: query [B, Hq, T, D], key/value [B, Hkv, T, D] -> ([B, T, Hq, D], None)."""
    session = _ACTIVE_SESSION.get()
    if session is None:
        raise RuntimeError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} only works inside composable_kv.hf "
            "(generate() or a PolicySession step); switch the model back with "
            "model.set_attn_implementation('sdpa') to use it on its own.")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        feature = "logit soft-capping (softcap)" if kwargs.get("softcap") is not None else "attention sinks (s_aux)"
        raise UnsupportedModelError(f"layer {module.layer_idx} uses {feature}, which composable_kv's attention does "
                                    "not implement; its output would differ from the model's")
    return session.attend(module.layer_idx, query, key, value, scaling, kwargs.get("sliding_window")), None


def check_model_features(model) -> None:
    """Refuse, before any work, a model whose attention does what our hook does not (never a silent change)."""
    cfg = getattr(model.config, "text_config", None) or model.config
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__} uses attention logit soft-capping (config.attn_logit_softcapping="
            f"{cfg.attn_logit_softcapping}), which composable_kv does not implement; outputs would differ")
    if any(name.endswith(".sinks") or name == "sinks" for name, _ in model.named_parameters()):
        raise UnsupportedModelError(f"{type(model).__name__} has learned attention sinks (a 'sinks' parameter), "
                                    "which composable_kv does not implement; outputs would differ")
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{type(model).__name__} is an encoder-decoder model; composable_kv decodes "
                                    "decoder-only causal models")


@contextlib.contextmanager
def _attn_implementation(model, name: str):
    """Temporarily switch ``model`` to attention implementation ``name``."""
    previous = model.config._attn_implementation
    if name == ATTN_IMPLEMENTATION:
        _register_attention()
    if previous != name:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if previous != name:
            model.set_attn_implementation(previous)


# --------------------------------------------------------------------------------------------
# Stats
# --------------------------------------------------------------------------------------------

@dataclass
class StepStats:
    """One decode step, per sequence of the batch (summed over layers and KV heads)."""

    pages_read: list[int]
    kv_bytes_read: list[int]
    dense_kv_bytes: list[int]  # bytes a dense read of every page of the sequence takes (all layers)
    active: list[bool]  # sequences still generating in this step


@dataclass
class GenerationOutput:
    sequences: list[list[int]]  # generated token ids per prompt (EOS included, nothing after it)
    texts: list[str] | None
    prompt_lengths: list[int]
    steps: list[StepStats] = field(default_factory=list)
    decode_path: str = ""  # which decode path ran (composable_kv.runtime): graph, device or host
    decode_layers: str = ""  # which decode layers ran (composable_kv.decoder): fused or modules
    prefill_source: str = ""  # "forward" (the model ran the prompts) or "replayed" (from a PrefillCache)

    def _mean_over_active(self, attr: str) -> list[float]:
        out = []
        for b in range(len(self.sequences)):
            vals = [getattr(s, attr)[b] for s in self.steps if s.active[b]]
            out.append(sum(vals) / len(vals) if vals else float("nan"))
        return out

    @property
    def kv_bytes_per_token(self) -> list[float]:
        """Mean KV bytes read per generated token (all layers), per prompt."""
        return self._mean_over_active("kv_bytes_read")

    @property
    def pages_per_token(self) -> list[float]:
        return self._mean_over_active("pages_read")

    @property
    def kv_read_fraction(self) -> list[float]:
        """KV bytes read / dense KV bytes, over all decode steps, per prompt."""
        read, dense = self._mean_over_active("kv_bytes_read"), self._mean_over_active("dense_kv_bytes")
        return [r / d if d else float("nan") for r, d in zip(read, dense)]


@dataclass
class _PrefillRecord:
    keys: list[torch.Tensor]  # per layer [sum(lengths), Hkv, D], real tokens, batch-major
    values: list[torch.Tensor]
    logits: torch.Tensor  # [B, V] next-token logits after the prompts
    queries: list[list[torch.Tensor]] = field(default_factory=list)  # per layer, per prompt [Hq, <= tail, D]
    scaling: dict[int, float | None] = field(default_factory=dict)  # layers a forward would observe -> sm_scale
    query_tail: int = PREFILL_QUERY_TAIL

    def replays_for(self, observers) -> bool:
        """Every observing stage reads at most the recorded last queries (else the prompt must run again)."""
        return all(s.prefill_queries() is not None and s.prefill_queries() <= self.query_tail for s in observers)


class PrefillCache:
    """Dense prefills keyed by their prompts, so that several policies share one prefill.

    Prefill is dense whatever the policy, so its K/V and last logits are policy independent;
    evaluating N policies on the same prompts then costs one prefill instead of N.
    """

    def __init__(self):
        self._records: dict[tuple, _PrefillRecord] = {}

    @staticmethod
    def key(token_lists) -> tuple:
        return tuple(tuple(t) for t in token_lists)

    def get(self, token_lists) -> _PrefillRecord | None:
        return self._records.get(self.key(token_lists))

    def put(self, token_lists, record: _PrefillRecord) -> None:
        self._records[self.key(token_lists)] = record

    def clear(self) -> None:
        self._records.clear()


# --------------------------------------------------------------------------------------------
# The session: one paged cache, one batch, prefill + decode steps
# --------------------------------------------------------------------------------------------

class PolicySession:
    """Runs ``model`` over a batch with ``pipeline`` deciding what each decode step reads.

    ``prefill(prompts)`` -> next-token logits [B, V]; ``decode(tokens)`` -> logits [B, V].
    ``decode_path`` (composable_kv.runtime): ``graph`` replays the whole decode step from one CUDA graph,
    ``device`` runs the same device-planned step eagerly, ``host`` plans on the host every step (stages
    that sync with the host, admission); ``auto`` picks the fastest that can run the policy and
    ``self.decode_path`` / ``describe()`` say which ran. Per-step read statistics add up on the device
    and come to the host once, when ``self.steps`` is read.

    ``layers`` (composable_kv.decoder): ``fused`` runs each decode layer of a Llama/Mistral/Qwen2 model as a
    few fused kernels around its GEMMs, ``modules`` through transformers' own modules; ``auto`` takes
    ``fused`` on CUDA where the family allows. Prefill always runs the modules.

    ``attention``: another dense decode attention to run in the policy's place inside the same step
    (e.g. FlashInfer, to compare against in ``benchmarks/e2e.py``): an object with
    ``prepare(session)``, called on the host before every decode step, and
    ``run(q [B, Hq, D], cache, layer, plan, sm_scale) -> [B, Hq, D]``, called per layer (graph-safe).
    """

    def __init__(self, model, policy=DEFAULT_POLICY, *, max_total_tokens: int, batch_size: int,
                 cache_dtype: torch.dtype | None = None, decode_path: str = "auto", layers: str = "auto",
                 attention=None):
        import composable_kv as ckv
        from .decoder import FusedDecoder, choose_layers
        from .runtime import choose_decode_path

        check_int("PolicySession", "max_total_tokens", max_total_tokens, 1)
        check_int("PolicySession", "batch_size", batch_size, 1)
        check_model_features(model)
        self.model = model
        self.pipeline = compile_policy(policy)
        from .distributed import rank_local_shape

        self.shape = rank_local_shape(model, ModelShape.of(model))  # this rank's heads under tensor parallelism
        self.device = next(model.parameters()).device
        self.dtype = cache_dtype or next(model.parameters()).dtype
        self.decode_path, self.decode_path_reason = choose_decode_path(decode_path, self.pipeline, self.device)
        self.max_total_tokens = max_total_tokens
        self._admission = self.pipeline.admission is not None
        self.layers, self.layers_reason = choose_layers(layers, model, self.device)
        self._decoder = FusedDecoder(model) if self.layers == "fused" else None
        self.attention = attention
        if attention is not None and (self.pipeline.selectors or self.pipeline.admission is not None):
            raise ValueError(f"attention= replaces a dense read; policy {self.pipeline.name!r} selects pages. "
                             "Pass a dense policy (configs/dense.yaml)")
        page = self.pipeline.page_size
        pages_per_seq = math.ceil(max_total_tokens / page) + 1
        if self.pipeline.admission is not None:  # an admission stage: gated head-major cache (policies/write_gate/admission.py)
            self.pipeline, self.cache = self.pipeline.admission.build_session(
                self.pipeline, model, self.shape, batch_size * pages_per_seq, self.dtype, self.device)
        else:
            self.cache = ckv.PagedKVCache(
                num_layers=self.shape.num_layers, num_kv_heads=self.shape.num_kv_heads,
                head_dim=self.shape.head_dim, num_pages=batch_size * pages_per_seq, page_size=page,
                dtype=self.dtype, device=self.device, summaries=self.pipeline.required_summaries)
        self.seq_ids: list[int] = []
        self._mode: str | None = None
        self._slots = None
        self._prefill_ids: list[int] = []  # the sequences of the prefill forward running now
        self._record: _PrefillRecord | None = None
        self.prefill_source: str | None = None  # "forward" (the model ran) or "replayed" (from a PrefillCache)
        self._step = None  # runtime.DeviceStep, built at the first device/graph decode
        self._acc_pages = self._acc_bytes = None  # [B] device: this step's reads, summed over layers
        self._pending: list[tuple] = []  # per step: (pages [B], bytes [B], active [B] bool) on the device, dense
        self._steps: list[StepStats] = []
        self._bytes_per_token_layer = 2 * self.shape.num_kv_heads * self.shape.head_dim * self.dtype.itemsize

    @property
    def graph_captured(self) -> bool:
        """The decode step has been captured as a CUDA graph (decode_path 'graph', after the first step)."""
        return self._step is not None and self._step.graph is not None

    def describe(self) -> str:
        write = f"; K/V write: {self.cache.fused_write}" if self.layers == "fused" else ""
        return (f"decode path: {self.decode_path} ({self.decode_path_reason})\n"
                f"decode layers: {self.layers} ({self.layers_reason}){write}\n"
                + self.pipeline.describe(self.device))

    @property
    def steps(self) -> list[StepStats]:
        """Per-step read statistics (the device counters come to the host here, in one copy)."""
        if self._pending:
            dev = torch.stack([torch.stack([p.to(torch.long), b.to(torch.long), a.to(torch.long)])
                               for p, b, a, _ in self._pending]).tolist()  # [N, 3, B]
            for (pages, nbytes, active), (*_, dense) in zip(dev, self._pending):
                self._steps.append(StepStats(pages, nbytes, dense, [bool(a) for a in active]))
            self._pending.clear()
        return self._steps

    # ---------------------------------------------------------------- public steps

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]], prefill_cache: PrefillCache | None = None) -> torch.Tensor:
        """Dense prefill of a batch of token-id lists (lengths may differ) -> logits [B, V].

        Consecutive prompts of one length run as one batch (at most ``PREFILL_TOKENS`` tokens a forward);
        no padding mask is ever built, so memory stays linear in the prompt length (flash SDPA, causal).
        With ``prefill_cache``, a prefill of the same prompts done before (under any policy) is
        replayed into this session's cache instead of running the model again.
        """
        if self.seq_ids:
            raise RuntimeError("PolicySession.prefill() runs once per session; start a new session.")
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError("Every prompt needs at least one token.")
        if max(lengths) >= self.max_total_tokens:
            raise ContextTooLongError(f"a prompt of {max(lengths)} tokens leaves no room to decode in a session "
                                      f"built for max_total_tokens={self.max_total_tokens}; raise it")
        record = prefill_cache.get(prompts) if prefill_cache is not None else None
        if record is not None and not record.replays_for(self._prefill_observers()):
            record = None  # a stage reads more of the prompt's queries than the record kept
        self.seq_ids = [self.cache.add_sequence() for _ in prompts]
        self.prefill_source = "replayed" if record is not None else "forward"
        if record is not None:
            slots = self.cache.reserve(self.seq_ids, lengths)
            for layer, (k, v) in enumerate(zip(record.keys, record.values)):
                self.cache.write(layer, slots, k.to(self.device, self.dtype), v.to(self.device, self.dtype))
            self._observe_recorded(record, lengths)
            logits = record.logits.clone()
        else:
            logits = self._prefill_forward(prompts, lengths, prefill_cache)
        if self.decode_path != "host":
            self.cache.reserve_ahead(self.seq_ids, self.max_total_tokens)
        return logits

    def _observe_recorded(self, record: _PrefillRecord, lengths: list[int]) -> None:
        """The observing stages see a replayed prefill as a forward shows it, one prompt at a time: its keys and
        the last queries the record kept, in the layers a forward observes (not windowed, not dense)."""
        observers = self._prefill_observers()
        for layer, scaling in record.scaling.items() if observers else ():
            if layer in self.pipeline.dense_layers:
                continue
            start = 0
            for b, (sid, n) in enumerate(zip(self.seq_ids, lengths)):
                key = record.keys[layer][start:start + n].transpose(0, 1)[None].to(self.device)  # [1, Hkv, T, D]
                query = record.queries[layer][b][None].to(self.device)  # [1, Hq, <= tail, D]
                for stage in observers:
                    stage.observe_prefill(self.cache, [sid], layer, query, key, None, scaling)
                start += n

    def _prefill_forward(self, prompts, lengths, prefill_cache) -> torch.Tensor:
        groups: list[list[int]] = []  # runs of consecutive prompts of one length, <= PREFILL_TOKENS a forward
        for b, n in enumerate(lengths):
            g = groups[-1] if groups else None
            if g is not None and lengths[g[0]] == n and (len(g) + 1) * n <= PREFILL_TOKENS:
                g.append(b)
            else:
                groups.append([b])
        L = self.shape.num_layers
        self._record = _PrefillRecord([[] for _ in range(L)], [[] for _ in range(L)], None,
                                      [[] for _ in range(L)]) if prefill_cache else None
        logits = []
        for group in groups:
            T = lengths[group[0]]
            input_ids = torch.tensor([list(prompts[b]) for b in group], dtype=torch.long)  # [g, T]
            positions = torch.arange(T)[None].expand(len(group), T)
            self._prefill_ids = [self.seq_ids[b] for b in group]
            self._slots = self.cache.reserve(self._prefill_ids, [T] * len(group))
            logits.append(self._forward("prefill", input_ids, positions, logits_to_keep=1)[:, -1])  # [g, V]
        logits = torch.cat(logits)
        if self._record is not None:
            self._record.keys = [torch.cat(ks) for ks in self._record.keys]
            self._record.values = [torch.cat(vs) for vs in self._record.values]
            self._record.logits = logits.clone()
            prefill_cache.put(prompts, self._record)
            self._record = None
        return logits

    @torch.no_grad()
    def decode(self, tokens: Sequence[int] | torch.Tensor, active: Sequence[bool] | torch.Tensor | None = None
               ) -> torch.Tensor:
        """Feed one token per sequence (a list or a [B] tensor, any device) -> logits [B, V] fp32.

        Nothing is copied back to the host: tokens and ``active`` may stay on the device."""
        if not self.seq_ids:
            raise RuntimeError("Call PolicySession.prefill() before decode().")
        B = len(self.seq_ids)
        tokens = torch.as_tensor(tokens).to(self.device, torch.long).view(-1)  # [B]
        if tokens.numel() != B:
            raise ValueError(f"decode: {tokens.numel()} tokens for a batch of {B} sequences")
        lengths = [self.cache.seq_len(s) for s in self.seq_ids]
        max_pos = self.shape.max_positions
        if max_pos is not None and max(lengths) >= max_pos:
            raise ContextTooLongError(
                f"Decoding position {max(lengths)} is past the model's maximum context "
                f"({max_pos} tokens); shorten the prompt or lower max_new_tokens.")
        if max(lengths) >= self.max_total_tokens:
            raise ContextTooLongError(f"decode: a sequence already holds {max(lengths)} tokens, the session was "
                                      f"built for max_total_tokens={self.max_total_tokens}")
        if self.attention is not None:
            self.attention.prepare(self)
        if self.decode_path == "host":
            positions = torch.tensor(lengths, dtype=torch.long)[:, None]  # [B, 1]
            slots = self.cache.reserve(self.seq_ids, [1] * B)
            self.pipeline.plan(self.cache, self.seq_ids)
            self._acc_pages = torch.zeros(B, dtype=torch.long, device=self.device)
            self._acc_bytes = torch.zeros(B, dtype=torch.long, device=self.device)
            logits = self.forward_decode(tokens.view(B, 1), positions, slots)
            pages, nbytes = self._acc_pages, self._acc_bytes
        else:
            if self._step is None:
                from .runtime import DeviceStep
                self._step = DeviceStep(self, graph=self.decode_path == "graph")
                self._acc_pages, self._acc_bytes = self._step.step_pages, self._step.step_bytes
            logits = self._step.run(tokens).clone()
            self.cache.advance(self.seq_ids)
            pages, nbytes = self._step.step_pages.clone(), self._step.step_bytes.clone()
        if active is None:
            active = torch.ones(B, dtype=torch.bool, device=self.device)
        active = torch.as_tensor(active).to(self.device, torch.bool)
        page = self.cache.page_size
        dense = [-(-(n + 1) // page) * page * self._bytes_per_token_layer * self.shape.num_layers for n in lengths]
        self._pending.append((pages, nbytes, active, dense))
        return logits

    def forward_decode(self, input_ids: torch.Tensor, positions: torch.Tensor, slots) -> torch.Tensor:
        """The model on one token per sequence through the policy: input_ids/positions [B, 1] -> [B, V] fp32.

        ``slots``: where each layer writes the new K/V (``AppendSlots``); the pipeline's plan is set."""
        self._slots = slots
        self._policy_pages = torch.zeros_like(self._acc_pages)  # [B] pages the policy's layers read
        self._sparse_layers = 0  # layers that scored summaries in this forward (fixed for a captured step)
        if self._decoder is not None:
            logits = self._decoder.forward(input_ids, positions, self.cache, slots, self._decode_attention)
        else:
            logits = self._forward("decode", input_ids, positions, logits_to_keep=1)[:, -1]
        self._acc_pages += self._policy_pages
        if not self._admission:  # the gated pipeline counts its bytes per layer
            self._acc_bytes += self.pipeline.bytes_for(self.cache, self._policy_pages,
                                                       self._sparse_layers).round().to(torch.long)
        return logits

    def close(self) -> None:
        for sid in self.seq_ids:
            self.cache.free(sid)
        self.seq_ids = []
        self._step = None

    # ---------------------------------------------------------------- internals

    def _forward(self, mode: str, input_ids: torch.Tensor, positions: torch.Tensor, logits_to_keep: int):
        self._mode = mode
        token = _ACTIVE_SESSION.set(self)
        try:
            with _attn_implementation(self.model, ATTN_IMPLEMENTATION):
                out = self.model(input_ids=input_ids.to(self.device), position_ids=positions.to(self.device),
                                 use_cache=False, logits_to_keep=logits_to_keep)
        finally:
            _ACTIVE_SESSION.reset(token)
            self._mode = None
        return out.logits.float()  # [B, logits_to_keep, V]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None, sliding_window: int | None = None) -> torch.Tensor:
        """query [B, Hq, T, D], key/value [B, Hkv, T, D] -> attention output [B, T, Hq, D].

        ``sliding_window``: the layer reads only its last ``sliding_window`` tokens (exactly, densely);
        the policy applies to the full-attention layers, and to windowed layers whose window covers the
        whole session (``max_total_tokens``), since there the window never cuts."""
        if key.shape[1] != self.shape.num_kv_heads or query.shape[1] != self.shape.num_q_heads:
            raise RuntimeError(
                f"layer {layer}: attention got {query.shape[1]} query / {key.shape[1]} KV heads, but the paged "
                f"cache was built for {self.shape.num_q_heads} / {self.shape.num_kv_heads} (model sharded in a "
                "way composable_kv.tp does not recognise?)")
        if self._mode == "prefill":
            return self._attend_prefill(layer, query, key, value, scaling, sliding_window)
        if self._mode == "decode":
            self.cache.write(layer, self._slots, key[:, :, 0].to(self.dtype), value[:, :, 0].to(self.dtype))
            out = self._decode_attention(layer, query[:, :, 0].to(self.dtype), scaling, sliding_window)
            return out.to(query.dtype)[:, None]  # [B, 1, Hq, D]
        raise RuntimeError("composable_kv attention called outside a PolicySession step.")

    def _window(self, layer: int, sliding_window: int | None) -> int | None:
        """The window a layer reads (None: the whole context, where the policy applies)."""
        window = sliding_window if sliding_window is not None and sliding_window < self.max_total_tokens else None
        if window is not None and self._admission:
            raise UnsupportedModelError(f"layer {layer} has sliding-window attention ({window} tokens), which the "
                                        f"admission stage {self.pipeline.admission.name!r} does not support; "
                                        "use a policy without write_gate")
        return window

    def _attend_prefill(self, layer, query, key, value, scaling, sliding_window):
        from .runtime import window_prefill

        window = self._window(layer, sliding_window)
        if window is not None:
            out = window_prefill(query, key, value, window, scaling)
        else:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                 enable_gqa=query.shape[1] != key.shape[1])  # [B, Hq, T, D]
        Hkv, D = key.shape[1], key.shape[3]
        k_real = key.transpose(1, 2).reshape(-1, Hkv, D)  # [g*T, Hkv, D], batch-major like reserve()
        v_real = value.transpose(1, 2).reshape(-1, Hkv, D)
        self.cache.write(layer, self._slots, k_real.to(self.dtype), v_real.to(self.dtype))
        if window is None and layer not in self.pipeline.dense_layers:
            valid = torch.ones(key.shape[0], key.shape[2], dtype=torch.bool, device=key.device)  # [g, T]
            for stage in self._prefill_observers():
                stage.observe_prefill(self.cache, self._prefill_ids, layer, query, key, valid, scaling)
        if self._record is not None:
            self._record.keys[layer].append(k_real)
            self._record.values[layer].append(v_real)
            if window is None:  # the layers a forward observes: their last queries, for a replay's observers
                self._record.queries[layer] += list(query[:, :, -self._record.query_tail:].clone())  # g x [Hq, tail, D]
                self._record.scaling[layer] = scaling
        return out.transpose(1, 2)  # [B, T, Hq, D]

    def _prefill_observers(self) -> list:
        """Selectors that build per-sequence state from the prefill's q/k (e.g. ltri's span index)."""
        return [s for s in self.pipeline.selectors if s.observes_prefill]

    def _decode_attention(self, layer: int, q: torch.Tensor, scaling: float | None,
                          sliding_window: int | None) -> torch.Tensor:
        """One layer's decode attention for q [B, Hq, D] (cache dtype; the new K/V already written) -> [B, Hq, D]:
        the policy, the layer's sliding window, or the dense `attention` stand-in; reads are counted."""
        from .runtime import window_decode

        window = self._window(layer, sliding_window)
        if window is None and self.attention is not None:
            plan = self.pipeline.current_plan
            scale = q.shape[-1] ** -0.5 if scaling is None else scaling
            out = self.attention.run(q, self.cache, layer, plan, scale)
            self._acc_pages += plan.num_pages.long() * self.shape.num_kv_heads
            self._acc_bytes += plan.seq_lens.long() * self._bytes_per_token_layer
            return out
        if window is None:
            res = self.pipeline.run(q, self.cache, layer, sm_scale=scaling)
            self._policy_pages += res.pages_read.sum(-1)
            if self._admission:
                self._acc_bytes += self.pipeline.kv_bytes_read(res, self.cache, layer).round().to(torch.long)
            elif not self.pipeline.is_dense_layer(layer):
                self._sparse_layers += 1
            return res.out
        plan = self.pipeline.current_plan
        scale = q.shape[-1] ** -0.5 if scaling is None else scaling
        out = window_decode(q, self.cache.k[layer], self.cache.v[layer], plan.page_table, plan.seq_lens,
                            window, scale)
        tokens = plan.seq_lens.clamp(max=window).to(torch.long)  # [B] tokens the window read
        first = (plan.seq_lens.long() - tokens) // self.cache.page_size
        self._acc_pages += (plan.num_pages.long() - first) * self.shape.num_kv_heads
        self._acc_bytes += tokens * self._bytes_per_token_layer
        return out


# --------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------

def _as_token_lists(tokenizer, prompts) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("Text prompts need a tokenizer; pass tokenizer= or token-id lists.")
            out.append(tokenizer(p, add_special_tokens=True)["input_ids"])
        else:
            out.append([int(t) for t in p])
    if not out:
        raise ValueError("prompts is empty.")
    return out


def _check_context(model, lengths: Sequence[int], extra: int) -> None:
    max_pos = ModelShape.of(model).max_positions
    if max_pos is not None and max(lengths) + extra > max_pos:
        raise ContextTooLongError(
            f"Prompt of {max(lengths)} tokens plus {extra} new tokens exceeds the model's maximum "
            f"context of {max_pos} tokens (config.max_position_embeddings); shorten the prompt or "
            "lower max_new_tokens.")


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    return ids


@torch.no_grad()
def generate(model, tokenizer, prompts, policy=DEFAULT_POLICY, max_new_tokens: int = 32, *,
             stop_at_eos: bool = True, on_step=None, prefill_cache: PrefillCache | None = None,
             decode_path: str = "auto", layers: str = "auto") -> GenerationOutput:
    """Greedy decoding of ``prompts`` (texts or token-id lists) with ``policy`` on ``model``.

    ``policy``: a YAML path, a dict, or a compiled ``DecodePipeline``. Returns the generated ids,
    their texts (if a tokenizer is given) and per-step read statistics.
    ``on_step(step_index)`` is called after every decode step (progress bars).
    ``prefill_cache`` lets several calls on the same prompts share one dense prefill.
    ``decode_path``, ``layers``: see :class:`PolicySession` (``auto`` replays one CUDA graph per step of fused
    layers where it can).
    The loop keeps tokens on the device; it looks at the host only every ``EOS_CHECK_EVERY`` steps, to
    stop once every sequence has ended.
    """
    check_int("generate", "max_new_tokens", max_new_tokens)
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1.")
    token_lists = _as_token_lists(tokenizer, prompts)
    check_token_ids("generate", token_lists, getattr(model.config, "vocab_size", None))
    lengths = [len(t) for t in token_lists]
    _check_context(model, lengths, max_new_tokens)
    session = PolicySession(model, policy, max_total_tokens=max(lengths) + max_new_tokens,
                            batch_size=len(token_lists), decode_path=decode_path, layers=layers)
    eos = _eos_ids(model, tokenizer) if stop_at_eos else set()
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    try:
        logits = session.prefill(token_lists, prefill_cache)  # [B, V]
        dev = logits.device
        eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=dev)
        active = torch.ones(len(token_lists), dtype=torch.bool, device=dev)  # [B]
        picked, was_active = [], []  # per step [B]: the greedy token, and whether the sequence still ran
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)  # [B], stays on the device
            picked.append(nxt)
            was_active.append(active)
            active = active & ~torch.isin(nxt, eos_ids)
            if step == max_new_tokens - 1:
                break
            if eos and step % EOS_CHECK_EVERY == EOS_CHECK_EVERY - 1 and not bool(active.any()):
                break  # the only host sync of the loop, every EOS_CHECK_EVERY steps
            logits = session.decode(torch.where(active, nxt, pad), active=active)
            if on_step is not None:
                on_step(step)
        picked_host = torch.stack(picked, 1).tolist()  # [B, steps]
        active_host = torch.stack(was_active, 1).tolist()
    finally:
        session.close()
    generated = [[t for t, a in zip(toks, act) if a] for toks, act in zip(picked_host, active_host)]
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True) if tokenizer is not None else None
    return GenerationOutput(sequences=generated, texts=texts, prompt_lengths=lengths, steps=session.steps,
                            decode_path=session.decode_path, decode_layers=session.layers,
                            prefill_source=session.prefill_source)


@torch.no_grad()
def teacher_forced_logits(model, context: Sequence[int], continuation: Sequence[int], policy,
                          on_step=None, prefill_cache: PrefillCache | None = None
                          ) -> tuple[torch.Tensor, list[StepStats]]:
    """Policy-path logits predicting ``continuation[1:]``, feeding the true tokens one at a time.

    Prefill ``context`` densely, then decode ``continuation[:-1]`` through the pipeline.
    Returns logits [len(continuation) - 1, V] (float32) and the per-step stats.
    """
    if len(continuation) < 2:
        raise ValueError("continuation needs at least 2 tokens.")
    _check_context(model, [len(context)], len(continuation))
    session = PolicySession(model, policy, max_total_tokens=len(context) + len(continuation), batch_size=1)
    try:
        session.prefill([list(context)], prefill_cache)
        rows = []
        for i, tok in enumerate(continuation[:-1]):
            rows.append(session.decode([int(tok)])[0])
            if on_step is not None:
                on_step(i)
    finally:
        session.close()
    return torch.stack(rows), session.steps


@torch.no_grad()
def dense_logits(model, context: Sequence[int], continuation: Sequence[int]) -> torch.Tensor:
    """Reference: one full forward with transformers' own sdpa attention over context+continuation.

    Returns logits [len(continuation) - 1, V] predicting ``continuation[1:]`` (float32).
    """
    ids = torch.tensor([list(context) + list(continuation)], dtype=torch.long, device=next(model.parameters()).device)
    n = len(continuation) - 1
    with _attn_implementation(model, "sdpa"):
        out = model(input_ids=ids, use_cache=False, logits_to_keep=n + 1)
    return out.logits[0, :n].float()
