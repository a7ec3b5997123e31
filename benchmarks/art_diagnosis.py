"""Why ART does (not) stop on real attention: per layer and KV head, for each stop rule, where it stops,
the exact unread softmax mass there, and the slack of the page bounds behind the certified stop.

A model reads the essays once (`--ctx` prompt tokens plus `--queries` continuation tokens, teacher forced,
dense causal attention); an attention hook keeps every layer's post-RoPE K/V and the queries of the
prompt's last `--snap-window` tokens (SnapKV's votes) and of the continuation tokens (the decode
queries). Per layer, a paged cache holds one sequence per decode query (prompt + continuation up to that
query, written after the prefill). Then, per setting (what is kept and in which order):

  dense_natural  every page, natural order (the ART paper's kernel)
  dense_box      every page, best-first by Quest's box bound (configs/dense_art.yaml)
  sink_window    64 sink + `--window-tokens` recent tokens, natural order (StreamingLLM)
  snapkv         SnapKV at `--budget` tokens, ART reads by vote (window and later pages first)
  quest          Quest at `--budget` tokens, best-first by its box bound
  ltri           Ltri-LLM at `--budget` tokens (spans from the prompt's attention, whole spans best-first by votes;
                 the capture then keeps every prompt query, which its span index reads)
  ltri_attn8, ltri_attn2   ltri with reps picked by the prompt's last 32 queries' attention instead of k-means,
                 spans of at most 8 pages (the setting until 2026-11-30) or 2 (the default)
  dense_box_last, quest_last   the same, with the request's last page first (the calibrated stop's order)

the kept set and order come from the project's own `pipeline.select`, and every stop rule runs through
the reference decode (`kernels/paged_decode/reference.py`, the implementation's semantics), certified
stops with the box bound, with other sound bounds (ball: `q.c + |q| r`; min of box and ball; pca16: a
box over the top 16 principal directions of the prompt's keys per KV head plus `|q_perp|` times the
page's largest residual norm; shadow8: the int8 key shadow, kernels/key_shadow) and with the exact page
max (an oracle bound that reads every key); calibrated stops (a heuristic: the box bound's tail scaled by
the ratio of mass to bound seen on the full pages already read) with the box and shadow8 bounds. The
oracle stop is the earliest check at which the true unread mass of the kept pages is <= delta for every
query head of the group: the best any stop can do in that order. Exact masses and the dense output come from the full softmax (fp64).

Outputs under --out: <tag>.json (every row), <tag>.md (tables), <tag>.png (plots).

  python benchmarks/art_diagnosis.py --tag smollm2-135m-4k                       # CPU, default model
  python benchmarks/art_diagnosis.py --settings dense_box,quest --rules cert-box,cert-exact,calib,oracle \\
      --tag smollm2-135m-4k-calibrated                                            # the calibrated stop only
  python benchmarks/art_diagnosis.py --model qwen2.5-coder-0.5b --ctx 32768 --device cuda \\
      --dtype bfloat16 --budget 2048 --tag qwen2.5-coder-0.5b-32k                # GPU, 32k model
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import harness  # noqa: E402  (benchmarks/harness.py)
import composable_kv as ckv  # noqa: E402
from composable_kv.kernels.page_select import reference as select_ref  # noqa: E402
from composable_kv.kernels.paged_decode import reference as decode_ref  # noqa: E402
from composable_kv.stages import StopRule  # noqa: E402
from composable_kv.pipeline import LayerContext  # noqa: E402

PAGE = 16
CHUNK = 4  # pages between two checks (the configs' chunk_pages)
PAPER = dict(scale_tol=1e-7, direction_tol=1e-3, patience=5)
DELTAS = (0.01, 0.05, 0.2)
CALIB_DELTAS = (0.02, 0.05, 0.1, 0.2)  # the calibrated (heuristic) stop's targets
CALIB_RECENT_DELTAS = (0.002, 0.005, 0.01, 0.02, 0.05)  # calibrate: recent (it underestimates: smaller deltas)
CALIB_ONCE_DELTAS = (0.02, 0.05, 0.1, 0.2)  # calibrate: once (the first chunk's slack, the stop from the bounds)
CHUNK16_DELTAS = (0.1, 0.2, 0.3)  # calibrate: all every 16 pages (the e2e configs' check interval), to compare
PCA_RANK = 16
SOUND = ("box", "ball", "min", "pca16", "shadow8")  # the sound page bounds compared (besides the exact max)
BYTES_NOTE = {  # per (page, KV head), bf16 cache: what the certified stop reads besides K/V
    "box": lambda D: 2 * D * 2, "ball": lambda D: D * 2 + 4, "min": lambda D: 3 * D * 2 + 4,
    "pca16": lambda D: 2 * PCA_RANK * 2 + 4, "shadow8": lambda D: PAGE * D + 2 * D * 2,
    "exact": lambda D: PAGE * D * 2}


def rules():
    """(name, StopRule or None, bound name, oracle delta or None)."""
    out = []
    for d in DELTAS:
        out.append((f"cert-box {d}", StopRule("certified", CHUNK, delta=d), "box", None))
    for d in (0.05, 0.2):
        out.append((f"cert-min {d}", StopRule("certified", CHUNK, delta=d), "min", None))
    out.append(("cert-pca16 0.05", StopRule("certified", CHUNK, delta=0.05), "pca16", None))
    out.append(("cert-shadow8 0.05", StopRule("certified", CHUNK, delta=0.05), "shadow8", None))
    out.append(("cert-exact 0.05", StopRule("certified", CHUNK, delta=0.05), "exact", None))
    for d in CALIB_DELTAS:
        out.append((f"calib-box {d}", StopRule("calibrated", CHUNK, delta=d), "box", None))
    for d in CALIB_RECENT_DELTAS:
        out.append((f"calib-recent-box {d}", StopRule("calibrated", CHUNK, delta=d, calibrate="recent"), "box",
                    None))
    for d in CHUNK16_DELTAS:  # every 16 pages, as the e2e configs check
        out.append((f"calib16-box {d}", StopRule("calibrated", 16, delta=d), "box", None))
    for d in CALIB_ONCE_DELTAS:  # a first chunk of 16 pages gives the slack
        out.append((f"calib16-once-box {d}", StopRule("calibrated", 16, delta=d, calibrate="once"), "box", None))
    out.append(("calib-shadow8 0.05", StopRule("calibrated", CHUNK, delta=0.05), "shadow8", None))
    out.append(("stab-paper fp32", StopRule("stability", CHUNK, **PAPER), None, None))
    out.append(("stab-paper bf16", StopRule("stability", CHUNK, acc_bf16=True, **PAPER), None, None))
    out.append(("stab 1e-3 fp32", StopRule("stability", CHUNK, scale_tol=1e-3, direction_tol=1e-3, patience=5),
                None, None))
    for d in (0.05, 0.1, 0.2):
        out.append((f"oracle {d}", None, None, d))
    return out


def wanted(name, prefixes):
    """--rules / --settings: keep `name` if it starts with one of the comma-separated prefixes (None: all)."""
    return prefixes is None or any(name.startswith(x) for x in prefixes.split(","))


def settings(args):
    art = {"stage": "art", "stop": "certified", "chunk_pages": CHUNK}  # certified: select() returns the box bounds
    calib = dict(art, stop="calibrated")
    return {
        "dense_natural": [dict(art, order="natural")],
        "dense_box": [art],
        "sink_window": [{"stage": "sink_window", "sink_tokens": 64, "window_tokens": args.window_tokens},
                        dict(art, order="natural")],
        "snapkv": [{"stage": "snapkv", "budget_tokens": args.budget, "window": args.snap_window}, art],
        "quest": [{"stage": "quest", "budget_tokens": args.budget}, art],
        "ltri": [{"stage": "ltri", "budget_tokens": args.budget}, art],
        # ltri's reps picked by the prompt's last 32 queries' attention, spans of at most 8 (the old setting) or 2 pages
        **{f"ltri_attn{n}": [{"stage": "ltri", "budget_tokens": args.budget, "obs_queries": 32, "max_span_pages": n},
                             art] for n in (8, 2)},
        # the calibrated stop's read order: as above, but the request's last page first
        "dense_box_last": [calib],
        "quest_last": [{"stage": "quest", "budget_tokens": args.budget}, calib],
    }


# ---------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------

def capture(args):
    """Dense prefill of ctx + queries essay tokens -> per layer (k, v [Hkv, T, D], q [Hq, W + NQ, D],
    the prompt's queries [Hq, ctx, D] when a setting reads them all (ltri), else None), scale."""
    from composable_kv import assets, traces

    dtype = getattr(torch, args.dtype)
    lm, tok = assets.load_model_and_tokenizer(args.model, dtype=dtype, device=args.device)
    T = args.ctx + args.queries
    ids = tok(assets.load_essays(args.essays), return_tensors="pt", add_special_tokens=False).input_ids[:, :T]
    if ids.shape[1] < T:
        raise SystemExit(f"error: --ctx {args.ctx} + --queries {args.queries}: the essays hold only "
                         f"{ids.shape[1]} tokens; lower --ctx")
    W = args.snap_window
    every_query = wanted("ltri", args.settings)
    grabbed, scale = {}, {}

    def grab(li, query, key, value, scaling):  # query [1, Hq, T, D], key/value [1, Hkv, T, D], post-RoPE
        grabbed[li] = (key[0].clone(), value[0].clone(), query[0, :, args.ctx - W:].clone(),
                       query[0, :, :args.ctx].clone() if every_query else None)
        scale[li] = scaling

    traces.forward_with_hook(lm, ids.to(args.device), grab)
    name = assets.resolve_model_path(args.model).name
    layers = sorted(grabbed)
    sm = scale[layers[0]] or grabbed[layers[0]][0].shape[-1] ** -0.5
    return grabbed, float(sm), name


# ---------------------------------------------------------------------------------------------
# Per layer
# ---------------------------------------------------------------------------------------------

def layer_cache(k, v, q_window, q_prompt_all, args, observers, sm_scale):
    """One sequence per decode query b: prompt (observed by the stages that read it: snapkv, ltri), then tokens
    ctx..ctx+b. q_prompt_all [Hq, ctx, D] or None: then only the last snap_window queries are real."""
    Hkv, T, D = k.shape
    NQ, ctx = args.queries, args.ctx
    pages = sum(-(-(ctx + b + 1) // PAGE) for b in range(NQ)) + 1
    cache = ckv.PagedKVCache(1, Hkv, D, pages, page_size=PAGE, dtype=getattr(torch, args.cache_dtype),
                             device=args.device, summaries=frozenset({"key_minmax", "value_norm", "key_shadow_int8"}),
                             validate=False)
    kk, vv = k.transpose(0, 1)[None].to(cache.dtype), v.transpose(0, 1)[None].to(cache.dtype)  # [1, T, Hkv, D]
    if q_prompt_all is not None:
        q_prompt = q_prompt_all[None].float()
    else:
        q_prompt = torch.zeros(1, q_window.shape[0], ctx, D, device=args.device)
        q_prompt[0, :, ctx - args.snap_window:] = q_window[:, :args.snap_window].float()  # only these vote
    sids = []
    for b in range(NQ):
        sid = cache.add_sequence()
        cache.append([sid], [ctx], kk[:, :ctx], vv[:, :ctx])
        for st in observers:
            st.observe_prefill(cache, [sid], 0, q_prompt, k[None, :, :ctx], None, sm_scale)
        cache.append([sid], [b + 1], kk[:, ctx:ctx + b + 1], vv[:, ctx:ctx + b + 1])
        sids.append(sid)
    return cache, sids


def pca_basis(k_prompt, rank):
    """Per KV head, the prompt keys' mean and top `rank` principal directions: k_prompt [Hkv, T, D] ->
    (mu [Hkv, D], U [Hkv, D, rank]) fp32."""
    k = k_prompt.float()
    mu = k.mean(1)
    x = k - mu[:, None]
    _, vecs = torch.linalg.eigh(x.transpose(1, 2) @ x)  # ascending eigenvalues
    return mu, vecs[..., -rank:].contiguous()


def page_bounds(qd, cache, plan, sm_scale, basis):
    """Per (query, KV head, page), max over the group: the bounds, the true page max and the dense page masses.

    qd [B, Hq, D] -> dict of [B, Hkv, P] fp32 (box, ball, min, exact; -inf past a request's pages),
    mass [B, Hq, P] fp64 (dense softmax per page), out_dense [B, Hq, D] fp64, lse [B, Hkv, G] fp64 (log of the
    dense softmax's normaliser)."""
    B, Hq, D = qd.shape
    Hkv = cache.num_kv_heads
    G = Hq // Hkv
    pt = plan.page_table.long()
    qg = qd.float().view(B, Hkv, G, D)
    k = cache.k[0][pt].float()  # [B, P, Hkv, S, D]
    v = cache.v[0][pt].double()
    P = pt.shape[1]
    tok = torch.arange(P * PAGE, device=qd.device).view(P, PAGE)
    real = tok[None] < plan.seq_lens.long()[:, None, None]  # [B, P, S]
    logits = torch.einsum("bhgd,bphsd->bhgps", qg, k) * sm_scale
    logits = logits.masked_fill(~real[:, None, None], float("-inf"))  # [B, Hkv, G, P, S]
    exact_g = logits.amax(-1)  # [B, Hkv, G, P]
    lse = torch.logsumexp(logits.double().flatten(-2), -1)  # [B, Hkv, G]
    prob = (logits.double() - lse[..., None, None]).exp()
    mass = prob.sum(-1).reshape(B, Hq, P)
    out_dense = torch.einsum("bhgps,bphsd->bhgd", prob, v).reshape(B, Hq, D)
    kmin, kmax = cache.key_min[0][pt].float(), cache.key_max[0][pt].float()  # [B, P, Hkv, D]
    qe = qg[:, :, :, None]  # [B, Hkv, G, 1, D]
    box_g = torch.maximum(qe * kmin.transpose(1, 2)[:, :, None], qe * kmax.transpose(1, 2)[:, :, None]).sum(-1)
    n = real.sum(-1).clamp(min=1)[:, :, None, None]  # [B, P, 1, 1]
    cen = (k * real[:, :, None, :, None]).sum(3) / n  # [B, P, Hkv, D]
    cen = cen.to(torch.bfloat16).float()  # stored as bf16; the radius is measured from the stored centroid
    rad = ((k - cen[:, :, :, None]).norm(dim=-1) * real[:, :, None]).amax(-1)  # [B, P, Hkv] (fp32, stored as is)
    ball_g = torch.einsum("bhgd,bphd->bhgp", qg, cen) + qg.norm(dim=-1)[..., None] * rad.transpose(1, 2)[:, :, None]
    box_g, ball_g = box_g * sm_scale, ball_g * sm_scale
    valid = plan.valid[:, None]  # [B, 1, P]
    mu, U = basis  # [Hkv, D], [Hkv, D, r]: a = U^T (k - mu), e = k - mu - U a
    a = torch.einsum("bphsd,hdr->bphsr", k - mu[None, None, :, None], U)
    e = (k - mu[None, None, :, None] - torch.einsum("bphsr,hdr->bphsd", a, U)).norm(dim=-1)  # [B, P, Hkv, S]
    m = real[:, :, None, :, None]
    amin = a.masked_fill(~m, float("inf")).amin(3).transpose(1, 2)  # [B, Hkv, P, r]
    amax = a.masked_fill(~m, float("-inf")).amax(3).transpose(1, 2)
    emax = (e * real[:, :, None]).amax(-1).transpose(1, 2)  # [B, Hkv, P]
    qt = torch.einsum("bhgd,hdr->bhgr", qg, U)  # [B, Hkv, G, r]
    q_perp = (qg - torch.einsum("bhgr,hdr->bhgd", qt, U)).norm(dim=-1)  # [B, Hkv, G]
    pca_g = (torch.einsum("bhgd,hd->bhg", qg, mu)[..., None]
             + torch.maximum(qt[:, :, :, None] * amin[:, :, None], qt[:, :, :, None] * amax[:, :, None]).sum(-1)
             + q_perp[..., None] * emax[:, :, None]) * sm_scale  # [B, Hkv, G, P]
    from composable_kv.kernels.key_shadow import reference as shadow_ref
    shadow = shadow_ref.shadow_scores(qd, cache.shadow_codes[8][0], cache.shadow_step[8][0], cache.key_min[0],
                                      plan.page_table, plan.seq_lens, sm_scale, 8)
    out = {"box": box_g.amax(2), "ball": ball_g.amax(2), "min": torch.minimum(box_g, ball_g).amax(2),
           "pca16": pca_g.amax(2), "shadow8": shadow, "exact": exact_g.amax(2)}
    out = {key: val.masked_fill(~valid, float("-inf")) for key, val in out.items()}
    for key in SOUND:  # soundness: every bound >= the true page max (fp32 rounding aside)
        gap = (out[key] - out["exact"])[valid.expand_as(out[key])]
        if gap.numel() and float(gap.min()) < -1e-3:
            raise AssertionError(f"{key} bound below the true page max by {-float(gap.min()):.2e}")
    return out, mass, out_dense, lse.view(B, Hkv, G)


def check_series(qd, cache, plan, order, count, sm_scale, acc_bf16):
    """The stability check's inputs along the whole kept list (no stop), replaying the reference's online
    softmax: per check after chunk c >= 1, d_mag and 1 - cos (max over the group) -> [B, Hkv, C] each,
    and which checks exist (the chunk read at least one page)."""
    B, Hq, D = qd.shape
    Hkv = cache.num_kv_heads
    G = Hq // Hkv
    qg = qd.float().view(B, Hkv, G, D)
    heads = torch.arange(Hkv, device=qd.device).view(1, Hkv, 1)
    tok = torch.arange(PAGE, device=qd.device)
    seq = plan.seq_lens.long()
    npg = (seq + PAGE - 1) // PAGE
    m = torch.full((B, Hkv, G), float("-inf"), device=qd.device)
    l = torch.zeros(B, Hkv, G, device=qd.device)
    acc = torch.zeros(B, Hkv, G, D, device=qd.device)
    prev = torch.zeros_like(acc)
    dmag, dcos, live_c = [], [], []
    slot = torch.arange(order.shape[-1], device=qd.device)
    pos = torch.where(slot < count[..., None], order.long(), -1)
    for c0 in range(0, int(count.max()), CHUNK):
        p = pos[..., c0:c0 + CHUNK]  # [B, Hkv, c]
        live = p >= 0
        phys = plan.page_table.long().gather(1, p.clamp(min=0).flatten(1)).view_as(p)
        k = cache.k[0][phys, heads].float()  # [B, Hkv, c, S, D]
        v = cache.v[0][phys, heads].float()
        in_page = torch.where(p == (npg - 1).view(B, 1, 1), (seq - (npg - 1) * PAGE).view(B, 1, 1), PAGE)
        ok = live[..., None] & (tok < in_page[..., None])  # [B, Hkv, c, S]
        s = torch.einsum("bhgd,bhcpd->bhgcp", qg, k) * sm_scale
        s = s.masked_fill(~ok[:, :, None], float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=(-1, -2)))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m - safe)
        w = torch.exp(s - safe[..., None, None])
        l = l * alpha + w.sum(dim=(-1, -2))
        acc = acc * alpha[..., None] + torch.einsum("bhgcp,bhcpd->bhgd", w, v)
        m = m_new
        o = acc / l.clamp(min=1e-30)[..., None]
        if acc_bf16:
            o = o.to(torch.bfloat16).float()
            acc = o * l[..., None]
        on, pn = o.norm(dim=-1), prev.norm(dim=-1)
        dmag.append(((on - pn).abs() / pn.clamp(min=1e-30)).amax(-1))
        dcos.append((1 - (o * prev).sum(-1) / (on * pn).clamp(min=1e-30)).amax(-1))
        live_c.append(live.any(-1) & (c0 > 0))
        prev = torch.where(live.any(-1)[..., None, None], o, prev)
    return torch.stack(dmag, -1), torch.stack(dcos, -1), torch.stack(live_c, -1)


def taus_at(mass_order, kept_mass, pages):
    """True unread share of the kept pages' mass after reading the first `pages` [B, Hkv, C] of the order, max
    over the group -> [B, Hkv, C], and the read mass [B, Hkv, G, C]. mass_order [B, Hkv, G, N] fp64 (dense-
    normalised page masses in list order, 0 past count), kept_mass [B, Hkv, G]."""
    cum = torch.nn.functional.pad(mass_order.cumsum(-1), (1, 0))  # [B, Hkv, G, N + 1]
    G = cum.shape[2]
    read = cum.gather(-1, pages.long()[:, :, None].expand(-1, -1, G, -1))
    return ((kept_mass[..., None] - read) / kept_mass[..., None]).clamp(min=0).amax(2), read


def oracle_pages(mass_order, kept_mass, count, delta):
    """Pages read at the earliest check (every CHUNK pages) where the true unread kept share <= delta: [B, Hkv]."""
    n = torch.arange(CHUNK, mass_order.shape[-1] + CHUNK, CHUNK, device=count.device)  # [C]
    pages = torch.minimum(n[None, None], count[..., None].long())  # [B, Hkv, C]
    tau, _ = taus_at(mass_order, kept_mass, pages)
    return pages.gather(-1, (tau <= delta).float().argmax(-1, keepdim=True))[..., 0]


def run_layer(layer, k, v, q, q_prompt_all, args, sm_scale, pipes):
    NQ, W = args.queries, args.snap_window
    observers = [p.selectors[0] for p in pipes.values() if p.selectors and p.selectors[0].observes_prefill]
    cache, sids = layer_cache(k, v, q, q_prompt_all, args, observers, sm_scale)
    qd = q[:, W:W + NQ].transpose(0, 1).float().contiguous()  # [NQ, Hq, D] decode queries
    B, Hq, D = qd.shape
    Hkv = cache.num_kv_heads
    G = Hq // Hkv
    plan = next(iter(pipes.values())).plan(cache, sids)  # every setting has the same page table
    bounds, mass, out_dense, lse = page_bounds(qd, cache, plan, sm_scale, pca_basis(k[:, :args.ctx], PCA_RANK))
    slack = bound_slack(bounds, plan, layer, Hkv)
    dense_n = out_dense.norm(dim=-1)
    rows, checks = [], []
    for sname, pipe in pipes.items():
        plan = pipe.plan(cache, sids)
        order, count, box_in_order = pipe.select(LayerContext(qd, cache, 0, plan, sm_scale))
        oidx = order.long().clamp(min=0)  # [B, Hkv, N]
        tokens = select_ref.page_token_counts(order, plan.seq_lens, PAGE)
        listed = torch.arange(order.shape[-1], device=qd.device) < count[..., None]  # [B, Hkv, N]
        mass_order = mass.view(B, Hkv, G, -1).gather(-1, oidx[:, :, None].expand(B, Hkv, G, -1))
        mass_order = mass_order * listed[:, :, None]  # [B, Hkv, G, N]
        kept_mass = mass_order.sum(-1)  # [B, Hkv, G]
        kept = decode_ref.paged_decode(qd, cache.k[0], cache.v[0], plan.page_table, plan.seq_lens, order, count,
                                       sm_scale=sm_scale)
        if sname in ("dense_box", "quest", "snapkv"):
            tail_slack(slack, sname, bounds, order, count, tokens, mass_order, kept_mass, lse)
        series = {}
        for rname, rule, bound, odelta in rules():
            if not wanted(rname, args.rules):
                continue
            out = None
            delta = odelta if odelta is not None else rule.delta if rule.kind.uses_bounds else None
            if odelta is not None:
                read = oracle_pages(mass_order, kept_mass, count, odelta)
            else:
                tail = terms = None
                if rule.kind.uses_bounds:
                    b_in_order = box_in_order if bound == "box" else bounds[bound].gather(-1, oidx)
                    tail = select_ref.strided_tail_lse(b_in_order, tokens, count, 1)
                    terms = select_ref.tail_terms(b_in_order, tokens, count)
                res = decode_ref.paged_decode(qd, cache.k[0], cache.v[0], plan.page_table, plan.seq_lens, order,
                                              count, sm_scale=sm_scale, rule=rule, tail_lse=tail,
                                              bound_terms=terms)
                read, out = res.pages_read, res.out
                if rule.kind == "stability":
                    if rule.acc_bf16 not in series:
                        series[rule.acc_bf16] = check_series(qd, cache, plan, order, count, sm_scale, rule.acc_bf16)
                    checks.append(stability_stats(sname, rname, layer, *series[rule.acc_bf16], mass_order))
            tau, read_mass = taus_at(mass_order, kept_mass, read[..., None])
            tau, read_mass = tau[..., 0], read_mass[..., 0]  # [B, Hkv], [B, Hkv, G]
            for h in range(Hkv):
                row = {"setting": sname, "rule": rname, "layer": layer, "head": h,
                       "pages_kept": float(count[:, h].float().mean()),
                       "pages_read": float(read[:, h].float().mean()),
                       "read_frac": float((read[:, h].float() / count[:, h].float()).mean()),
                       "stopped": float((read[:, h] < count[:, h]).float().mean()),
                       "tau_true_mean": float(tau[:, h].mean()), "tau_true_max": float(tau[:, h].max()),
                       "tau_over_delta": float((tau[:, h] > delta).float().mean()) if delta else float("nan"),
                       "kept_mass": float(kept_mass[:, h].mean()),
                       "missed_vs_dense": float((1 - read_mass[:, h]).amax(-1).mean())}
                if out is not None:
                    hq = slice(h * G, (h + 1) * G)
                    err_d = (out[:, hq].double() - out_dense[:, hq]).norm(dim=-1) / dense_n[:, hq]
                    err_k = (out[:, hq] - kept.out[:, hq]).norm(dim=-1) / kept.out[:, hq].norm(dim=-1)
                    row["err_vs_dense"] = float(err_d.mean())
                    row["err_vs_kept"] = float(err_k.mean())
                rows.append(row)
    return rows, slack, checks


def bound_slack(bounds, plan, layer, Hkv):
    """Per KV head: quantiles over (query, page) of bound - true page max (nats), for each sound bound."""
    valid = plan.valid[:, None].expand_as(bounds["exact"])
    out = []
    for h in range(Hkv):
        row = {"layer": layer, "head": h}
        for key in SOUND:
            gap = (bounds[key] - bounds["exact"])[:, h][valid[:, h]].float()
            q = torch.quantile(gap, torch.tensor([0.1, 0.5, 0.9], device=gap.device)).tolist()
            row.update({f"{key}_p10": q[0], f"{key}_med": q[1], f"{key}_p90": q[2]})
        out.append(row)
    return out


def tail_slack(slack, sname, bounds, order, count, tokens, mass_order, kept_mass, lse):
    """At the oracle-0.05 point of this order: LSE_R(U_b + log n_b) - max_g log sum_{t in R} e^{s_gt} (nats),
    the factor e^slack by which the certificate overstates the unread mass, for each sound bound."""
    stop = oracle_pages(mass_order, kept_mass, count, 0.05)  # [B, Hkv]
    slot = torch.arange(order.shape[-1], device=order.device)
    rest = (slot >= stop[..., None]) & (slot < count[..., None])  # [B, Hkv, N] unread at that point
    unread = (mass_order * rest[:, :, None]).sum(-1)  # [B, Hkv, G] dense-normalised
    true_tail = (unread.clamp(min=1e-300).log() + lse).amax(-1).float()  # log sum_R e^s, max over the group
    has = rest.any(-1)
    for key in SOUND:
        terms = bounds[key].gather(-1, order.long().clamp(min=0)) + tokens.float().clamp(min=1).log()
        T = torch.logsumexp(terms.masked_fill(~rest, float("-inf")), -1)  # [B, Hkv]
        for h, row in enumerate(slack):
            sl = (T - true_tail)[:, h][has[:, h]]
            row[f"tail_{key}_{sname}"] = float(sl.median()) if sl.numel() else float("nan")


MASS_BINS = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1.0)


def stability_stats(sname, rname, layer, dmag, dcos, live, mass_order):
    """Per check: did it pass the scale / direction tolerance, against the chunk's share of the mass read so far."""
    B, Hkv, G, N = mass_order.shape
    C = dmag.shape[-1]
    pad = C * CHUNK - N
    chunk_mass = torch.nn.functional.pad(mass_order, (0, max(pad, 0)))[..., :C * CHUNK]
    chunk_mass = chunk_mass.view(B, Hkv, G, C, CHUNK).sum(-1)  # [B, Hkv, G, C]
    read_so_far = chunk_mass.cumsum(-1)
    share = (chunk_mass / read_so_far.clamp(min=1e-300)).amax(2).float()  # [B, Hkv, C]
    tol = PAPER if "paper" in rname else {"scale_tol": 1e-3, "direction_tol": 1e-3}
    ok_s = (dmag <= tol["scale_tol"]) & live
    ok_d = (dcos <= tol["direction_tol"]) & live
    out = {"setting": sname, "rule": rname, "layer": layer, "checks": int(live.sum()),
           "pass_scale": int(ok_s.sum()), "pass_dir": int(ok_d.sum()), "pass_both": int((ok_s & ok_d).sum()),
           "dmag_median": float(dmag[live].median()) if live.any() else float("nan"),
           "dcos_median": float(dcos[live].median()) if live.any() else float("nan"), "bins": []}
    for lo, hi in zip(MASS_BINS[:-1], MASS_BINS[1:]):
        sel = live & (share > lo) & (share <= hi) if lo > 0 else live & (share <= hi)
        out["bins"].append([int(sel.sum()), int((sel & ok_s & ok_d).sum())])
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def mean(xs):
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(rows, key, by):
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[b] for b in by), []).append(r.get(key, float("nan")))
    return {g: mean(v) for g, v in groups.items()}


def write_markdown(path, meta, rows, slack, checks, sparse_layers):
    R = [r for r in rows if r["layer"] in sparse_layers]
    lines = [f"# ART stop diagnosis: {meta['model']}, {meta['ctx']} tokens", "",
             f"Command: `{meta['command']}` (commit {meta['commit']}, {meta['device']}, {meta['seconds']:.0f} s).",
             f"{meta['queries']} decode queries (teacher-forced continuation tokens {meta['ctx']}..), "
             f"{meta['num_layers']} layers x {meta['num_kv_heads']} KV heads; page {PAGE}, checks every {CHUNK} pages; "
             f"budgets {meta['budget']} tokens (quest, snapkv), sink_window 64 + {meta['window_tokens']}. "
             f"Averages over layers {sparse_layers[0]}-{sparse_layers[-1]} (the configs keep layers 0-1 dense), "
             "KV heads and queries.", "",
             "*read* = pages read / pages kept; *tau* = true unread share of the kept pages' softmax mass at the "
             "stop (max over the group's query heads; the certified stop bounds it by delta); *missed* = softmax "
             "mass not read, of the dense total (selection + stop); *err* = ||o - o_dense|| / ||o_dense||; "
             "*stopped* = share of (layer, head, query) where the rule stopped before the end of the list; "
             "*tau > delta* = share of (layer, head, query) whose true tau exceeds the rule's delta (certified: "
             "must be 0; calibrated: the heuristic's misses).", ""]
    lines += ["## Selection: the dense softmax mass on the kept pages", "",
              "Per (layer, KV head, query), the share of the dense softmax mass (the group's query heads averaged) "
              "that the kept pages hold, before any stop; p10: of the (layer, KV head) means over the queries.", "",
              "| setting | pages kept | kept mass (mean) | kept mass (p10) |", "|---|---:|---:|---:|"]
    for sname in meta["settings"]:
        sel = {(r["layer"], r["head"]): r for r in R if r["setting"] == sname}.values()  # the same for every rule
        kept = sorted(r["kept_mass"] for r in sel)
        if kept:
            lines.append(f"| {sname} | {mean([r['pages_kept'] for r in sel]):.1f} | {mean(kept):.3f} "
                         f"| {kept[len(kept) // 10]:.3f} |")
    lines.append("")
    names = [r[0] for r in rules()]
    for sname in meta["settings"]:
        lines += [f"## {sname}", "",
                  "| rule | read | stopped | tau mean | tau max | tau > delta | missed | err vs dense | err vs kept |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for rn in names:
            sel = [r for r in R if r["setting"] == sname and r["rule"] == rn]
            if not sel:
                continue
            lines.append(f"| {rn} | {mean([r['read_frac'] for r in sel]):.3f} "
                         f"| {mean([r['stopped'] for r in sel]):.2f} "
                         f"| {mean([r['tau_true_mean'] for r in sel]):.4f} | {max(r['tau_true_max'] for r in sel):.4f} "
                         f"| {mean([r.get('tau_over_delta', float('nan')) for r in sel]):.3f} "
                         f"| {mean([r['missed_vs_dense'] for r in sel]):.4f} "
                         f"| {mean([r.get('err_vs_dense', float('nan')) for r in sel]):.4f} "
                         f"| {mean([r.get('err_vs_kept', float('nan')) for r in sel]):.4f} |")
        lines.append("")
    lines += ["## Bound slack (nats): bound - true page max, over (query, page); tail slack at the oracle-0.05 point",
              "", "Bytes per (page, KV head) besides K/V (" + ", ".join(
                  f"{b} {BYTES_NOTE[b](meta['head_dim'])} B" for b in (*SOUND, "exact")) +
              f"; K+V of a page: {2 * PAGE * meta['head_dim'] * 2} B). Tail slack: "
              "LSE_R(U + log n) - log sum_R e^s, i.e. the certificate overstates the unread mass by e^slack.", "",
              "| layer.head | " + " | ".join(f"{b} p10/med/p90" for b in SOUND) +
              " | tail box (dense_box / quest) | tail shadow8 (dense_box / quest) |",
              "|---|" + "---|" * (len(SOUND) + 2)]
    for s in slack:
        f = lambda k: "/".join(f"{s[f'{k}_{q}']:.1f}" for q in ("p10", "med", "p90"))  # noqa: E731
        t = lambda k: " / ".join(f"{s.get(f'tail_{k}_{n}', float('nan')):.1f}"  # noqa: E731
                                 for n in ("dense_box", "quest"))
        lines.append(f"| {s['layer']}.{s['head']} | " + " | ".join(f(b) for b in SOUND)
                     + f" | {t('box')} | {t('shadow8')} |")
    S = [s for s in slack if s["layer"] in sparse_layers]
    lines += ["", "| bound | bytes / page / KV head | median slack (mean over sparse layer.heads) "
              "| tail slack dense_box | tail slack quest |",
              "|---|---:|---:|---:|---:|"]
    for b in SOUND:
        lines.append(f"| {b} | {BYTES_NOTE[b](meta['head_dim'])} | {mean([s[f'{b}_med'] for s in S]):.2f} | "
                     f"{mean([s.get(f'tail_{b}_dense_box', float('nan')) for s in S]):.2f} | "
                     f"{mean([s.get(f'tail_{b}_quest', float('nan')) for s in S]):.2f} |")
    lines += ["", "## Stability checks: why the stop fires or not", "",
              "Every check along the whole kept list (no stop). *scale* / *dir* / *both*: share of checks within the "
              "tolerance; then the share passing both, by the chunk's share of the mass read so far "
              "(max over the group).", "",
              "| setting | rule | checks | scale | dir | both | median d_mag | median 1-cos | " +
              " | ".join(f"<= {hi:g}" if lo == 0 else f"({lo:g}, {hi:g}]"
                         for lo, hi in zip(MASS_BINS[:-1], MASS_BINS[1:])) + " |",
              "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(MASS_BINS) - 1)]
    for sname in meta["settings"]:
        for rn in ("stab-paper fp32", "stab-paper bf16", "stab 1e-3 fp32"):
            sel = [c for c in checks if c["setting"] == sname and c["rule"] == rn and c["layer"] in sparse_layers]
            if not sel:
                continue
            n = sum(c["checks"] for c in sel)
            bins = [[sum(c["bins"][i][j] for c in sel) for j in (0, 1)] for i in range(len(MASS_BINS) - 1)]
            lines.append(f"| {sname} | {rn} | {n} | {sum(c['pass_scale'] for c in sel) / n:.3f} | "
                         f"{sum(c['pass_dir'] for c in sel) / n:.3f} | {sum(c['pass_both'] for c in sel) / n:.3f} | "
                         f"{mean([c['dmag_median'] for c in sel]):.1e} | "
                         f"{mean([c['dcos_median'] for c in sel]):.1e} | " +
                         " | ".join(f"{p / t:.2f} ({t})" if t else "-" for t, p in bins) + " |")
    lines += ["", "## Per layer and KV head (dense_box and quest; read / tau)", "",
              "| layer.head | " + " | ".join(f"{s}: {r}" for s in ("dense_box", "quest") for r in
                                            ("cert-box 0.05", "cert-shadow8 0.05", "stab-paper bf16",
                                             "oracle 0.05")) + " |",
              "|---|" + "---|" * 8]
    idx = {(r["setting"], r["rule"], r["layer"], r["head"]): r for r in rows}
    for s in slack:
        cells = []
        for sn in ("dense_box", "quest"):
            for rn in ("cert-box 0.05", "cert-shadow8 0.05", "stab-paper bf16", "oracle 0.05"):
                r = idx.get((sn, rn, s["layer"], s["head"]))
                cells.append(f"{r['read_frac']:.2f} / {r['tau_true_mean']:.3f}" if r else "-")
        lines.append(f"| {s['layer']}.{s['head']} | " + " | ".join(cells) + " |")
    cal_cols = [(sn, rn) for sn in ("dense_box_last", "quest_last")
                for rn in ("calib-box 0.05", "calib-box 0.1", "oracle 0.05", "oracle 0.1")]
    lines += ["", "## Per layer and KV head (calibrated stop, last page first; read / tau)", "",
              "| layer.head | " + " | ".join(f"{sn}: {rn}" for sn, rn in cal_cols) + " |",
              "|---|" + "---|" * len(cal_cols)]
    for s in slack:
        cells = []
        for sn, rn in cal_cols:
            r = idx.get((sn, rn, s["layer"], s["head"]))
            cells.append(f"{r['read_frac']:.2f} / {r['tau_true_mean']:.3f}" if r else "-")
        lines.append(f"| {s['layer']}.{s['head']} | " + " | ".join(cells) + " |")
    lines += ["", "## Per layer and KV head (stability stop, natural order and snapkv; read / tau)", "",
              "| layer.head | " + " | ".join(f"{s}: {r}" for s in ("dense_natural", "sink_window", "snapkv") for r in
                                            ("stab-paper fp32", "stab-paper bf16")) + " |",
              "|---|" + "---|" * 6]
    for s in slack:
        cells = []
        for sn in ("dense_natural", "sink_window", "snapkv"):
            for rn in ("stab-paper fp32", "stab-paper bf16"):
                r = idx.get((sn, rn, s["layer"], s["head"]))
                cells.append(f"{r['read_frac']:.2f} / {r['tau_true_mean']:.3f}" if r else "-")
        lines.append(f"| {s['layer']}.{s['head']} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(path, meta, rows, slack, sparse_layers):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = sorted({s["layer"] for s in slack})
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    a = ax[0, 0]
    for key, c in (("box", "C0"), ("ball", "C1"), ("min", "C2"), ("pca16", "C5"), ("shadow8", "C3")):
        a.plot(layers, [mean([s[f"{key}_med"] for s in slack if s["layer"] == L]) for L in layers], c, marker="o",
               ms=3, label=f"{key} ({BYTES_NOTE[key](meta['head_dim'])} B/page)")
        a.plot(layers, [mean([s.get(f"tail_{key}_quest", float("nan")) for s in slack if s["layer"] == L])
                        for L in layers], c, ls="--", lw=1)
    a.set(xlabel="layer", ylabel="nats",
          title="bound slack: median page (solid), tail at oracle 0.05 on quest (dashed)")
    a.legend(fontsize=8)
    by = summarize(rows, "read_frac", ("setting", "rule", "layer"))
    a = ax[0, 1]
    for sn, rn, c in (("quest", "cert-box 0.05", "C0"), ("quest", "cert-min 0.05", "C2"),
                      ("quest", "cert-pca16 0.05", "C5"), ("quest", "cert-shadow8 0.05", "C3"),
                      ("quest", "cert-exact 0.05", "C7"), ("quest", "oracle 0.05", "k"),
                      ("quest_last", "calib-box 0.05", "C1"), ("quest_last", "calib-box 0.1", "C6"),
                      ("quest_last", "oracle 0.05", "0.5")):
        ys = [by.get((sn, rn, L), float("nan")) for L in layers]
        if any(y == y for y in ys):
            a.plot(layers, ys, c, marker="o", ms=3, ls="--" if sn == "quest_last" else "-", label=f"{rn} ({sn})")
    a.set(xlabel="layer", ylabel="pages read / kept",
          title=f"quest {meta['budget']}: certified and calibrated stops vs the oracle",
          ylim=(0, 1.05))
    a.legend(fontsize=8)
    a = ax[1, 0]
    stab = any(r["rule"].startswith("stab") for r in rows)
    stab_settings = ("dense_natural", "C0"), ("sink_window", "C1"), ("snapkv", "C2"), ("dense_box", "C4")
    for sn, c in stab_settings if stab else ():
        for rn, ls in (("stab-paper fp32", ":"), ("stab-paper bf16", "-")):
            a.plot(layers, [by.get((sn, rn, L), float("nan")) for L in layers], c, ls=ls,
                   marker="o" if ls == "-" else None, ms=3, label=f"{sn} {rn.split()[-1]}")
    title = "stability stop (paper tolerances): fp32 dotted, bf16 solid"
    if not stab:  # not run: the calibrated stop on dense instead
        title = "dense_box_last: calibrated stop (dashed) vs the oracle (solid)"
        for rn, c, ls in (("calib-box 0.02", "C2", "--"), ("calib-box 0.05", "C1", "--"), ("calib-box 0.1", "C6", "--"),
                          ("oracle 0.05", "k", "-"), ("oracle 0.1", "0.5", "-")):
            a.plot(layers, [by.get(("dense_box_last", rn, L), float("nan")) for L in layers], c, ls=ls, marker="o",
                   ms=3, label=rn)
    a.set(xlabel="layer", ylabel="pages read / kept", title=title, ylim=(0, 1.05))
    a.legend(fontsize=7, ncol=2)
    a = ax[1, 1]
    shown = 0
    for sn, rn, c, mk in (("dense_natural", "stab-paper bf16", "C0", "o"),
                          ("sink_window", "stab-paper bf16", "C1", "o"),
                          ("snapkv", "stab-paper bf16", "C2", "o"), ("dense_box", "stab-paper bf16", "C4", "o"),
                          ("quest", "stab-paper bf16", "C3", "o"), ("dense_box_last", "calib-box 0.05", "C4", "x"),
                          ("quest_last", "calib-box 0.05", "C3", "x")):
        sel = [r for r in rows if r["setting"] == sn and r["rule"] == rn and r["layer"] in sparse_layers]
        if sel:
            a.scatter([r["read_frac"] for r in sel], [max(r["tau_true_mean"], 1e-6) for r in sel], s=10, c=c,
                      marker=mk, label=f"{sn} {rn}")
            shown += 1
    a.set(xlabel="pages read / kept", ylabel="true unread mass of the kept pages", yscale="log" if shown else "linear",
          title="heuristic stops (stab-paper bf16: o, calib-box 0.05: x)\nper layer.head: where, and what is left")
    a.legend(fontsize=8)
    fig.suptitle(f"ART diagnosis: {meta['model']}, {meta['ctx']} tokens ({meta['tag']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a named model (e.g. qwen2.5-coder-0.5b), HF folder or .gguf; "
                                                 "default: the default model")
    p.add_argument("--essays", default=None, help="folder of .txt essays (default: the cached essays)")
    p.add_argument("--ctx", type=int, default=4096, help="prompt tokens (default: %(default)s)")
    p.add_argument("--queries", type=int, default=8, help="decode queries: continuation tokens (default: %(default)s)")
    p.add_argument("--snap-window", type=int, default=32, help="snapkv's W (default: %(default)s)")
    p.add_argument("--budget", type=int, default=1024, help="quest and snapkv budget in tokens (default: %(default)s)")
    p.add_argument("--window-tokens", type=int, default=1024, help="sink_window's recent tokens (default: %(default)s)")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: every layer)")
    p.add_argument("--settings", default=None, help="comma-separated settings to run (default: all: "
                                                    "dense_natural, dense_box, sink_window, snapkv, quest, ltri, "
                                                    "ltri_attn8, ltri_attn2, dense_box_last, quest_last)")
    p.add_argument("--rules", default=None, help="comma-separated rule-name prefixes, e.g. cert-box,calib,oracle "
                                                 "(default: every rule)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="model dtype (default: %(default)s; bfloat16 on the GPU)")
    p.add_argument("--cache-dtype", default="bfloat16", help="paged cache dtype (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "art"), help="output folder (default: %(default)s)")
    p.add_argument("--tag", default=None, help="file name stem (default: model and ctx)")
    args = p.parse_args(argv)
    for flag, val, lo in (("--ctx", args.ctx, 2 * PAGE), ("--queries", args.queries, 1),
                          ("--snap-window", args.snap_window, 1), ("--budget", args.budget, PAGE)):
        if val < lo:
            p.error(f"{flag}: expected >= {lo}, got {val}")
    if args.snap_window > args.ctx:
        p.error(f"--snap-window {args.snap_window} is longer than --ctx {args.ctx}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    grabbed, sm_scale, model_name = capture(args)
    layers = sorted(grabbed) if args.layers is None else [int(x) for x in args.layers.split(",")]
    missing = sorted(set(layers) - set(grabbed))
    if missing:
        p.error(f"--layers: the model has layers 0..{max(grabbed)}, not {missing}")
    pipes = {name: ckv.compile({"name": name, "page_size": PAGE, "dense_layers": [], "stages": stages},
                               backend="reference") for name, stages in settings(args).items()
             if wanted(name, args.settings)}
    if not pipes:
        p.error(f"--settings {args.settings}: none of {list(settings(args))}")
    rows, slack, checks = [], [], []
    print(f"captured {len(grabbed)} layers in {time.time() - t0:.0f} s", file=sys.stderr)
    for layer in layers:
        k, v, q, q_prompt_all = grabbed[layer]
        r, s, c = run_layer(layer, k, v, q, q_prompt_all, args, sm_scale, pipes)
        rows += r
        slack += s
        checks += c
        print(f"layer {layer} done ({time.time() - t0:.0f} s)", file=sys.stderr)
    k0 = grabbed[layers[0]][0]
    tag = args.tag or f"{Path(str(args.model or 'smollm2-135m')).name}-{args.ctx}"
    commit = harness.git_commit()
    meta = {"model": model_name, "tag": tag, "ctx": args.ctx, "queries": args.queries, "budget": args.budget,
            "window_tokens": args.window_tokens, "snap_window": args.snap_window, "num_layers": len(layers),
            "num_kv_heads": k0.shape[0], "head_dim": k0.shape[-1], "sm_scale": sm_scale, "device": args.device,
            "dtype": args.dtype, "cache_dtype": args.cache_dtype, "commit": commit, "torch": torch.__version__,
            "command": "python benchmarks/art_diagnosis.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "settings": list(pipes), "rules": [r[0] for r in rules() if wanted(r[0], args.rules)],
            "seconds": time.time() - t0}
    sparse = [L for L in layers if L >= 2] or layers
    (out_dir / f"{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows, "slack": slack, "checks": checks}))
    write_markdown(out_dir / f"{tag}.md", meta, rows, slack, checks, sparse)
    plot(out_dir / f"{tag}.png", meta, rows, slack, sparse)
    print(f"wrote {out_dir / tag}.{{json,md,png}} in {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
