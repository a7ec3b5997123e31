"""End-to-end decode on the GPU: tokens/s, ms per step, prefill time and peak memory, next to the floor.

Every provider decodes the same batch in the same run:
  transformers : the model's own ``generate`` (sdpa attention, its DynamicCache), the user's default;
  ckv <policy> : ``composable_kv.hf.PolicySession`` on the decode runtime (one CUDA-graph replay a step);
  ckv <policy> [modules] : the same, through transformers' own decode layers instead of the fused ones;
  flashinfer / flashinfer-tc : FlashInfer's paged decode (CUDA-core / tensor-core) in place of our
                 attention, inside the same graph step (``PolicySession(attention=...)``).
The floor of a step is the bytes it must read (weights + the K/V and summaries read, from the
session's own counters) over the copy bandwidth measured in this run; ``floor %`` = floor / step.

    python benchmarks/e2e.py --out DIR                     # the GPU run (gpu/e2e.sh)
    python benchmarks/e2e.py --out DIR --quick             # a small model and sizes (smoke)

The first ckv provider of a size runs the real prefill (timed); with ``--synthetic-kv`` (default for
models over 2B parameters) the others fill the cache with random K/V through a PrefillCache-shaped
replay, which costs no prefill: decode timing does not depend on the values, except where ART stops.
Policies that observe the prefill (ltri, attention_predictor, snapkv) run their real prefill instead.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import harness  # noqa: E402  (benchmarks/harness.py: timer, FlashInfer wrapper, report)
import composable_kv  # noqa: E402,F401  (registers the stages)
from composable_kv import assets, hf  # noqa: E402

SHAPES = {
    "llama3-8b-shape": dict(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                            max_position_embeddings=140000, rope_theta=500000.0),
    "qwen2.5-0.5b-shape": dict(family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                               num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                               max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True),
    "tiny-llama": dict(family="llama", vocab_size=32000, hidden_size=512, intermediate_size=1024,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                       max_position_embeddings=40000),
}
POLICIES = {
    "ckv dense": {"name": "dense", "page_size": 16, "stages": [{"stage": "attend"}]},
    "ckv quest": {"name": "quest-2048", "page_size": 16, "dense_layers": [0, 1],
                  "stages": [{"stage": "quest", "budget_tokens": 2048}, {"stage": "attend"}]},
    "ckv quest+art": {"name": "quest-art-2048", "page_size": 16, "dense_layers": [0, 1],
                      "stages": [{"stage": "quest", "budget_tokens": 2048},
                                 {"stage": "art", "stop": "certified", "delta": 0.01, "chunk_pages": 4}]},
    "ckv quest+art-calibrated": {"name": "quest-art-calibrated-2048", "page_size": 16, "dense_layers": [0, 1],
                                 "stages": [{"stage": "quest", "budget_tokens": 2048},
                                            {"stage": "art", "stop": "calibrated", "delta": 0.02, "chunk_pages": 4}]},
}
BASELINES = ("flashinfer", "flashinfer-tc", "transformers")


def provider_policy(provider: str):
    """The policy a provider decodes with: a named one, `ckv <config>.yaml` (any YAML policy), or dense pages for
    the flashinfer baselines (their attention runs in the policy's place)."""
    if provider.startswith("ckv ") and provider.endswith(".yaml"):
        return provider[len("ckv "):]
    return POLICIES.get(provider, POLICIES["ckv dense"]) if provider.startswith("flashinfer") else POLICIES[provider]


@dataclass
class Row:
    model: str
    weights: str
    batch: int
    context: int
    provider: str
    decode_path: str = ""
    ms_per_step: float = float("nan")
    tokens_per_s: float = float("nan")
    prefill_s: float = float("nan")
    peak_gb: float = float("nan")
    kv_gb_per_step: float = float("nan")
    floor_ms: float = float("nan")
    floor_frac: float = float("nan")
    note: str = ""
    extra: dict = field(default_factory=dict)


def build_model(name: str, dtype, device, path: str | None):
    import transformers as tr
    if path:
        return assets.load_model(path, dtype=dtype, device=device).eval(), "real"
    cfg = dict(SHAPES[name])
    family = cfg.pop("family")
    config = (tr.LlamaConfig if family == "llama" else tr.Qwen2Config)(**cfg, eos_token_id=None, bos_token_id=None,
                                                                       pad_token_id=0)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = (tr.LlamaForCausalLM if family == "llama" else tr.Qwen2ForCausalLM)(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval(), "random"


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: all but the input embedding (B rows) unless it is tied."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total if emb is out else total - emb.numel() * emb.element_size()


def observes_prefill(policy) -> bool:
    """Whether a stage of `policy` builds its state from the prompt's queries (ltri, attention_predictor, snapkv): a
    synthetic K/V record cannot stand in for its prefill."""
    return any(s.observes_prefill for s in composable_kv.compile(policy).selectors)


class SyntheticPrefill:
    """A PrefillCache look-alike whose record makes random K/V one layer at a time (no model prefill). Not for
    policies that observe the prefill: the session would run the forward and record every layer's K/V beside
    its cache (at B=16, 32k on the 8B shape that ran out of memory, 4703b95)."""

    def __init__(self, shape, vocab: int, device, dtype, seed: int = 0):
        self.shape, self.vocab, self.device, self.dtype, self.seed = shape, vocab, device, dtype, seed

    def get(self, prompts):
        n = sum(len(p) for p in prompts)
        shape, dev, dtype, seed = self.shape, self.device, self.dtype, self.seed

        class Layers:
            def __init__(self, salt):
                self.salt = salt

            def __iter__(self):
                g = torch.Generator(device=dev).manual_seed(seed + self.salt)
                for _ in range(shape.num_layers):
                    yield torch.randn(n, shape.num_kv_heads, shape.head_dim, generator=g, device=dev, dtype=dtype)

        class Record:
            keys, values = Layers(0), Layers(1)
            logits = torch.zeros(len(prompts), self.vocab, device=dev)

            @staticmethod
            def replays_for(observers) -> bool:  # no queries: only for policies that observe no prefill
                return not observers

        return Record()


class FlashInferAttention:
    """FlashInfer's paged decode in the decode step's graph (``PolicySession(attention=...)``), through its
    CUDA-graph wrapper. The session reserves its pages ahead, so the page table is read once; each step
    re-plans the wrapper on the host (FlashInfer's plan needs the lengths there) from B lengths, and the
    page indices are gathered on the device."""

    def __init__(self, session, tensor_cores: bool):
        dev = session.device
        self.table = session.cache.padded_page_table(session.seq_ids)[0].to(dev)  # [B, P] page ids
        self.cols = torch.arange(self.table.shape[1], device=dev)                    # [P]
        sh, S = session.shape, session.cache.page_size
        self.heads = dict(num_q_heads=sh.num_q_heads, num_kv_heads=sh.num_kv_heads, head_dim=sh.head_dim,
                          page_size=S, dtype=session.dtype)
        indptr, indices, last = self._plan_inputs(session)
        self.indptr, self.last = indptr.to(dev), last.to(dev)
        self.indices = torch.zeros(self.table.numel(), dtype=torch.int32, device=dev)
        self.indices[:len(indices)] = indices
        self.wrapper = harness.flashinfer_decode(self.indptr, self.indices, self.last, tensor_cores=tensor_cores,
                                                 graph=True, **self.heads)

    def _plan_inputs(self, session):
        """(indptr [B+1] host, indices [sum of pages] device, last page lengths [B] host) for the next step."""
        S = session.cache.page_size
        lens = torch.tensor([session.cache.seq_len(s) + 1 for s in session.seq_ids])  # the step's token included
        counts = (lens + S - 1) // S
        indptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
        used = self.cols[None, :] < counts.to(self.table.device)[:, None]            # [B, P]
        return indptr, self.table[used], ((lens - 1) % S + 1).to(torch.int32)

    def prepare(self, session) -> None:
        indptr, indices, last = self._plan_inputs(session)
        h = self.heads
        self.wrapper.plan(indptr, indices, last, h["num_q_heads"], h["num_kv_heads"], h["head_dim"], h["page_size"],
                          q_data_type=h["dtype"], kv_data_type=h["dtype"])

    def run(self, q, cache, layer, plan, sm_scale):
        return self.wrapper.run(q, (cache.k[layer], cache.v[layer]))


def essay_ids(model_path: str) -> list[int]:
    """The essays corpus in the real model's tokenizer: the prompts' text under --text essays."""
    return assets.load_tokenizer(model_path)(assets.load_essays())["input_ids"]


def make_prompts(B: int, ctx: int, vocab: int, text_ids: list[int] | None) -> list[list[int]]:
    """B prompts of ctx tokens: windows of the essays at B evenly spaced offsets (wrapping), or random ids."""
    if text_ids is None:
        g = torch.Generator().manual_seed(ctx + B)
        return torch.randint(10, vocab, (B, ctx), generator=g).tolist()
    ids = text_ids * (1 + ctx // len(text_ids) + 1)
    step = max(1, len(text_ids) // B)
    return [ids[b * step:b * step + ctx] for b in range(B)]


def time_session(model, policy, prompts, steps: int, shape, *, attention=None, prefill_cache=None,
                 layers: str = "auto"):
    """Prefill, one decode step (graph capture), then `steps` timed steps. -> (ms/step, prefill s, session stats)."""
    B = len(prompts)
    s = hf.PolicySession(model, policy, max_total_tokens=len(prompts[0]) + steps + 2, batch_size=B, layers=layers)
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = s.prefill(prompts, prefill_cache)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t0
        if attention is not None:
            s.attention = attention(s)
        logits = s.decode(logits.argmax(-1))  # eager first step + capture
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in range(steps):
            logits = s.decode(logits.argmax(-1))
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t1) / steps * 1e3
        st = s.steps[1:]
        kv = sum(sum(x.kv_bytes_read) for x in st) / len(st)
        return ms, prefill, kv, f"{s.decode_path}, {s.layers} layers"
    finally:
        s.close()


def time_transformers(model, prompts, steps: int):
    """model.generate (sdpa): per-step times from a logits processor that syncs and stamps each step."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return scores

    model.set_attn_implementation("sdpa")
    ids = torch.tensor(prompts, device=next(model.parameters()).device)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=steps + 2, min_new_tokens=steps + 2, do_sample=False, pad_token_id=0,
                   logits_processor=LogitsProcessorList([Stamp()]))
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return sum(gaps) / len(gaps) * 1e3, stamps[0] - t0


def run(args) -> tuple[list[Row], float]:
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    bw = harness.copy_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows: list[Row] = []
    for mname in args.models:
        path = args.model_path if mname == args.real_model else None
        model, weights = build_model(mname, dtype, dev, path)
        text_ids = essay_ids(path) if (path and args.text == "essays") else None
        wbytes = weight_bytes(model)
        nparams = sum(p.numel() for p in model.parameters())
        shape = hf.ModelShape.of(model)
        synthetic = args.synthetic_kv if args.synthetic_kv is not None else nparams > 2e9
        print(f"{mname} ({weights} weights): {nparams / 1e9:.2f} B params, {wbytes / 1e9:.2f} GB read per step",
              flush=True)
        for size in args.sizes:
            ctx, B = (int(x) for x in size.split("x"))
            max_pos = shape.max_positions or 1 << 30
            ctx = min(ctx, max_pos - args.steps - 4)
            prompts = make_prompts(B, ctx, model.config.vocab_size, text_ids if weights == "real" else None)
            base = dict(model=mname, weights=weights, batch=B, context=ctx)
            first = True
            for prov in args.providers:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
                r = Row(**base, provider=prov)
                try:
                    if prov == "transformers":
                        if B * ctx > args.hf_max_tokens:
                            r.note = f"skipped: B x context > --hf-max-tokens {args.hf_max_tokens}"
                            rows.append(r)
                            continue
                        r.ms_per_step, r.prefill_s = time_transformers(model, prompts, args.steps)
                        kv = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 2 * B * (ctx + args.steps / 2)
                        r.decode_path = "transformers eager"
                    else:
                        attention = None
                        base_prov, _, layers = prov.partition(" [")  # "ckv dense [modules]": transformers' layers
                        layers = layers.rstrip("]") or "auto"
                        policy = provider_policy(base_prov)
                        if prov.startswith("flashinfer"):
                            tc = prov == "flashinfer-tc"
                            attention = lambda s, tc=tc: FlashInferAttention(s, tc)  # noqa: E731
                        cache = None if (first or not synthetic or observes_prefill(policy)) else SyntheticPrefill(
                            shape, model.config.vocab_size, dev, dtype)
                        r.ms_per_step, prefill, kv, r.decode_path = time_session(
                            model, policy, prompts, args.steps, shape, attention=attention, prefill_cache=cache,
                            layers=layers)
                        r.prefill_s = prefill if cache is None else float("nan")
                        r.note = "synthetic K/V" if cache is not None else (
                            "real prefill (the policy observes it)" if synthetic and not first else "")
                        first = False
                    r.tokens_per_s = B / (r.ms_per_step * 1e-3)
                    r.kv_gb_per_step = kv / 1e9
                    r.floor_ms = (wbytes + kv) / bw * 1e3
                    r.floor_frac = r.floor_ms / r.ms_per_step
                except torch.cuda.OutOfMemoryError as e:
                    r.note = "OOM: " + str(e).split("\n")[0][:120]
                except Exception as e:  # noqa: BLE001 (a provider that fails is reported, the run goes on)
                    r.note = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                r.peak_gb = torch.cuda.max_memory_allocated(dev) / 1e9
                rows.append(r)
                print(f"  B={B:3d} ctx={ctx:6d} {prov:16s} {r.ms_per_step:9.2f} ms/step {r.tokens_per_s:9.1f} tok/s "
                      f"floor {r.floor_frac * 100:5.1f}%  prefill {r.prefill_s:6.2f}s peak {r.peak_gb:6.1f} GB "
                      f"{r.decode_path} {r.note}", flush=True)
        del model
        torch.cuda.empty_cache()
    return rows, bw


def markdown(rows: list[Row], meta: dict) -> str:
    out = [f"Copy bandwidth {meta['copy_tbps']:.2f} TB/s; {meta['steps']} decode steps timed after one "
           "warm-up/capture step; bf16.", "",
           "| model | weights | B | context | provider | path | ms/step | tok/s | floor % | x ckv dense "
           "| KV GB/step | prefill s | peak GB | note |", "|" + "---|" * 14]
    dense = {(r.model, r.batch, r.context): r.ms_per_step for r in rows if r.provider == "ckv dense"}
    for r in rows:
        ref = dense.get((r.model, r.batch, r.context), float("nan"))
        out.append(f"| {r.model} | {r.weights} | {r.batch} | {r.context} | {r.provider} | {r.decode_path} "
                   f"| {r.ms_per_step:.2f} | {r.tokens_per_s:,.0f} | {r.floor_frac * 100:.0f} | {ref / r.ms_per_step:.2f} "
                   f"| {r.kv_gb_per_step:.2f} | {r.prefill_s:.2f} | {r.peak_gb:.1f} | {r.note} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for e2e.json and e2e.md")
    ap.add_argument("--models", default="llama3-8b-shape,qwen2.5-0.5b-shape")
    ap.add_argument("--sizes", default="8192x1,8192x16,8192x64,32768x1,32768x16",
                    help="CONTEXTxBATCH list, comma-separated")
    ap.add_argument("--providers", default="ckv dense,ckv quest,ckv quest+art,flashinfer,flashinfer-tc,transformers")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--real-model", default="qwen2.5-0.5b-shape", help="which --models entry --model-path loads")
    ap.add_argument("--model-path", default=None, help="real weights (GGUF or HF folder) for --real-model")
    ap.add_argument("--text", choices=("random", "essays"), default="random",
                    help="prompt tokens of the --model-path model: random ids, or the essays (real attention)")
    ap.add_argument("--synthetic-kv", type=lambda s: s == "1", default=None)
    ap.add_argument("--hf-max-tokens", type=int, default=600_000, help="skip transformers above B x context")
    ap.add_argument("--quick", action="store_true", help="tiny-llama, 2048x4, 8 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.sizes, args.steps = "tiny-llama", "2048x4", 8
    args.models = [m for m in args.models.split(",") if m]
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.providers = [p for p in args.providers.split(",") if p]
    for m in args.models:
        if m not in SHAPES:
            ap.error(f"--models: unknown {m!r}; known: {sorted(SHAPES)}")
    for s in args.sizes:
        if not (len(s.split("x")) == 2 and all(x.isdigit() and int(x) > 0 for x in s.split("x"))):
            ap.error(f"--sizes: {s!r} is not CONTEXTxBATCH (e.g. 32768x16)")
    known = set(POLICIES) | set(BASELINES)
    for p in args.providers:
        base = p[:-len(" [modules]")] if p.endswith(" [modules]") else p
        if base.startswith("ckv ") and base.endswith(".yaml"):
            if not Path(base[len("ckv "):]).is_file():
                ap.error(f"--providers: {p!r} names no file; give a policy YAML, e.g. 'ckv configs/quest_art.yaml'")
        elif p not in known and base not in POLICIES:
            ap.error(f"--providers: unknown {p!r}; known: {sorted(known)}, 'ckv <policy>.yaml', and any ckv one + "
                     "' [modules]' (transformers' own decode layers instead of the fused ones)")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, bw = run(args)
    meta = harness.run_meta(steps=args.steps, text=args.text, copy_tbps=bw / 1e12)  # the bandwidth of the floors
    harness.write_report(out, "e2e", meta, [asdict(r) for r in rows], markdown(rows, meta),
                         title="End-to-end decode")
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
