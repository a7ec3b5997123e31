"""Kernel timings on the GPU (Llama-8B shapes: 32 q heads, 8 KV heads, D=128, bf16, page 16).

    python benchmarks/kernel_sweep.py [--quick] [--out rows.csv]
    python benchmarks/kernel_sweep.py --parts art_decode --shape qwen-0.5b --batch 16 --ctx 32768 [--tune]
    python benchmarks/kernel_sweep.py --parts select,select_sweep --shape qwen-0.5b --batch 16 --budget-pages 256

Dense decode vs FlashInfer's BatchDecodeWithPagedKVCacheWrapper (when importable), with a sweep of
BLOCK pages / warps / stages / splits; Quest score+select vs the summary bytes at HBM speed; Quest-ART
decode. Random K/V: ART's stop does not fire meaningfully on random keys (nearly flat attention), only its cost is timed.

art_decode: why an ART decode that reads every page is slower than dense decode reading the same bytes. One
cache, one split count; rows add one ingredient at a time (the order list, a best-first order, the stop rule
and its chunk, then num_stages / block_pages), each timed from a CUDA graph, with the K/V bytes it read;
then the ordering launch before it (art_order rows: one global sort against the split-local order).

select: Quest's score + select launch, timed from a CUDA graph, at the Llama cases or at the one
--shape/--batch/--ctx names (quest-4096-art at 32k, B = 16 on the 0.5B model: qwen-0.5b, 16, --budget-pages 256);
score only against score + select gives the selection's share; select_sweep adds tiles, warps, stages and the
scoring slices per row.
"""
import argparse
import csv
import itertools
import sys

from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402
from composable_kv.cuda_graphs import host_us as _host_us  # noqa: E402
from composable_kv.fused import splits_for  # noqa: E402
from composable_kv.kernels.page_select import triton as select_tk  # noqa: E402
from composable_kv.kernels.paged_decode import triton as decode_tk  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
SHAPES = {"llama-8b": (HQ, HKV, D), "qwen-0.5b": (14, 2, 64)}  # (q heads, KV heads, head dim)
PARTS = ("dense", "pipeline", "host_profile", "select", "select_sweep", "quest_decode", "art_decode")


def select_cases(args) -> list[tuple[str, int, int]]:
    """(shape, B, ctx) the select part times: the three Llama cases, or the one --shape/--batch/--ctx names
    (a flag left out takes qwen-0.5b / 16 / 32768 there)."""
    if args.shape is None and args.batch is None and args.ctx is None:
        return [("llama-8b", 32, 32768), ("llama-8b", 64, 32768), ("llama-8b", 8, 131072)]
    return [(args.shape or "qwen-0.5b", args.batch or 16, args.ctx or 32768)]


def make(B, ctx, dtype=torch.bfloat16, seed=0, hq=HQ, hkv=HKV, d=D):
    g = torch.Generator(device="cuda").manual_seed(seed)
    P = ctx // PAGE
    n = B * P
    k = torch.randn(n, hkv, PAGE, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(n, hkv, PAGE, d, device="cuda", dtype=dtype, generator=g)
    table = torch.randperm(n, device="cuda", generator=g).to(torch.int32).view(B, P)
    lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(B, hq, d, device="cuda", dtype=dtype, generator=g)
    kmin, kmax = k.amin(2).contiguous(), k.amax(2).contiguous()
    return q, k, v, table, lens, kmin, kmax


def bench(fn):
    return harness.median_ms(fn, warmup_ms=10, rep_ms=40) * 1e3  # us


def bench_graph(fn, n=20):
    """us per call of fn replayed from a CUDA graph of n calls (no host launch cost); None if capture fails."""
    try:
        return harness.graph_ms(fn, warmup_ms=10, rep_ms=40, calls=n) * 1e3
    except Exception as e:  # noqa: BLE001
        print("graph capture failed:", type(e).__name__, e, file=sys.stderr)
        return None


def flashinfer_decode(q, k, v, table, lens, graph=False, tensor_cores=False):
    if harness.flashinfer() is None:
        print("flashinfer unavailable: its rows are left out", file=sys.stderr)
        return None
    B, P = table.shape
    indptr = torch.arange(0, B * P + 1, P, dtype=torch.int32, device="cuda")
    last = torch.full((B,), PAGE, dtype=torch.int32, device="cuda")
    w = harness.flashinfer_decode(indptr, table.flatten().contiguous(), last, num_q_heads=q.shape[1],
                                  num_kv_heads=k.shape[1], head_dim=k.shape[-1], page_size=PAGE, dtype=q.dtype,
                                  graph=graph, tensor_cores=tensor_cores)
    return lambda: w.run(q, (k, v))


def _pipeline_case(policy, B, ctx, hq, hkv, d):
    """A compiled policy on a random paged cache: (run callable, plan callable)."""
    import yaml
    from composable_kv.cache import PagedKVCache
    from composable_kv.pipeline import compile as compile_policy
    from composable_kv.summaries import KEY_MINMAX, VALUE_NORM
    cfg = yaml.safe_load(open(policy))
    cfg["dense_layers"] = []
    pipe = compile_policy(cfg)
    P = ctx // PAGE
    dev = torch.device("cuda", torch.cuda.current_device())
    cache = PagedKVCache(1, hkv, d, B * P, PAGE, torch.bfloat16, dev, summaries={KEY_MINMAX, VALUE_NORM})
    ids = [cache.add_sequence() for _ in range(B)]
    cache.reserve(ids, [ctx] * B)
    cache.k[0].normal_()
    cache.v[0].normal_()
    cache.rebuild_summaries(0)
    q = torch.randn(B, hq, d, device=dev, dtype=torch.bfloat16)
    pipe.plan(cache, ids)
    return (lambda: pipe.run(q, cache, 0)), pipe


def art_order(q, table, lens, kmin, kmax, S, within_splits=True):
    """dense + ART's score_select (fused.run_layer's launch 1): every page, best-first by the Quest box bound,
    the request's last page first; split-local order (the pipeline's) or one global order.
    -> (order [B, Hkv, P], count [B, Hkv], tail [B, Hkv, P], terms [B, Hkv, P], phys [B, Hkv, P] or None:
    the list's physical pages, written by the split-local order as the pipeline asks)."""
    B, P = table.shape
    hkv, d = kmin.shape[1], kmin.shape[-1]
    terms = torch.empty(B, hkv, P, dtype=torch.float32, device=q.device)  # [B, Hkv, P] U + log n, list order
    phys = torch.empty(B, hkv, P, dtype=torch.int32, device=q.device) if within_splits else None
    order, count, tail = select_tk.score_select(
        q, kmin, kmax, table, lens, torch.zeros(B, P, dtype=torch.bool, device=q.device), num_kv_heads=hkv,
        page_size=PAGE, sm_scale=d ** -0.5, score=1, select=False, budget_pages=0, forced_only=False,
        certified=True, num_splits=S, max_kept=P, terms_out=terms, last_first=True, within_splits=within_splits,
        phys_out=phys)
    return order, count, tail, terms, phys


def art_decode_cases(q, k, v, table, lens, kmin, kmax, S):
    """The art_decode rows on one cache: [(labels, fn)], each fn one launch_decode with S splits.

    The list is the pipeline's (art_order), built here once, outside the timed calls. delta 1e-9 never
    stops: those rows read every page, the bytes dense reads."""
    from composable_kv.stages import StopRule
    B, P = table.shape
    hkv, d = k.shape[1], k.shape[-1]
    dev = q.device
    order, count, tail, terms, phys = art_order(q, table, lens, kmin, kmax, S)
    ident = torch.arange(P, dtype=torch.int32, device=dev).expand(B, hkv, P).contiguous()  # [B, Hkv, P]

    def dec(lst=order, rule=None, **kw):
        return lambda: decode_tk.launch_decode(q, k, v, table, lens, lst, count, sm_scale=d ** -0.5, rule=rule,
                                               tail_lse=tail, bound_terms=terms, num_splits=S,
                                               out_dtype=q.dtype, **kw)

    def stop(kind, chunk, delta=1e-9):
        return StopRule(kind=kind, chunk_pages=chunk, delta=delta)

    cases = [(dict(case="dense, natural order"), dec(natural=True))]
    for tc in (False, True):  # the strongest dense decodes we can run, same cache, same graph timer
        try:
            fi = flashinfer_decode(q, k, v, table, lens, graph=True, tensor_cores=tc)
        except RuntimeError as e:  # FlashInfer's default decode has no kernel for some group sizes (7: Qwen2.5)
            print(f"skip FlashInfer decode{', tensor cores' if tc else ''}: {str(e).splitlines()[-1]}",
                  file=sys.stderr)
            continue
        if fi is not None:
            cases.append((dict(case=f"FlashInfer decode{', tensor cores' if tc else ''} (dense)"), fi))
    cases += [
             (dict(case="list, identity order"), dec(ident)),
             (dict(case="list, best-first order"), dec()),
             (dict(case="list, best-first order, physical pages"), dec(phys=phys))]
    cases += [(dict(case=f"{kind}, never stops", chunk=c), dec(rule=stop(kind, c)))
              for kind in ("certified", "calibrated") for c in (4, 16, 64)]
    # num_stages: the kernel's NUM_STAGES pipelines the no-rule loop; these rows show what it does to the ART loop
    cases += [(dict(case="calibrated, never stops", chunk=16, num_stages=ns),
               dec(rule=stop("calibrated", 16), num_stages=ns)) for ns in (1, 2, 3, 4)]
    cases += [(dict(case="calibrated, never stops", chunk=16, block_pages=bp),
               dec(rule=stop("calibrated", 16), block_pages=bp)) for bp in (4, 8, 16)]
    cases += [(dict(case="calibrated, delta 0.1", chunk=4), dec(rule=stop("calibrated", 4, delta=0.1)))]
    # the pipeline's dense + ART launch (fused.run_layer: physical pages) and dense, at each BLOCK_PAGES:
    # what --tune records
    cases += [(dict(case="dense, natural order", block_pages=bp, tune="dense"), dec(natural=True, block_pages=bp))
              for bp in TUNE_BLOCKS]
    cases += [(dict(case="calibrated, never stops, physical pages", chunk=16, block_pages=bp, tune="art"),
               dec(rule=stop("calibrated", 16), phys=phys, block_pages=bp)) for bp in TUNE_BLOCKS]
    # a whole dense + ART layer: score_select then the decode (two launches), or the decode ordering its own
    # pages (one launch, order_from): what --tune records as "/order"
    def layer(one, rule, bp):
        if one:
            return lambda: decode_tk.launch_decode(q, k, v, table, lens, None, None, sm_scale=d ** -0.5, rule=rule,
                                                   num_splits=S, out_dtype=q.dtype, block_pages=bp,
                                                   order_from=(kmin, kmax))

        def two():
            o, c, t, tm, ph = art_order(q, table, lens, kmin, kmax, S)
            return decode_tk.launch_decode(q, k, v, table, lens, o, c, sm_scale=d ** -0.5, rule=rule, tail_lse=t,
                                           bound_terms=tm, num_splits=S, out_dtype=q.dtype, block_pages=bp,
                                           phys=ph)
        return two
    for once in (False, True):
        rule = StopRule(kind="calibrated", chunk_pages=16, delta=1e-9, calibrate="once" if once else "all")
        cases += [(dict(case=f"layer: order + decode, calibrated{' once' if once else ''}, never stops, "
                             f"{'one launch' if one else 'two launches'}", chunk=16, block_pages=8,
                        order="decode" if one else "separate", tune="art-order" if not once else None),
                   layer(one, rule, 8)) for one in (False, True)]
    # calibrate: once: the first chunk, the stop point from the bounds, then a plain list read (no checks)
    cases += [(dict(case="calibrated once, never stops, physical pages", chunk=16, block_pages=bp),
               dec(rule=StopRule(kind="calibrated", chunk_pages=16, delta=1e-9, calibrate="once"), phys=phys,
                   block_pages=bp)) for bp in (8, 16)]
    return cases


def art_split_cases(q, k, v, table, lens, kmin, kmax, S):
    """More programs: dense + ART's launch at 2x and 4x the pipeline's split count (each split orders and
    stops on its own pages, so this changes what is read on real attention; here nothing stops)."""
    from composable_kv.stages import StopRule
    d = k.shape[-1]
    cases = []
    for mult in (1, 2, 4):
        order, count, tail, terms, phys = art_order(q, table, lens, kmin, kmax, S * mult)
        cases.append((dict(case=f"calibrated, never stops, physical pages, {S * mult} splits", chunk=16,
                           block_pages=8),
                      lambda o=order, c=count, t=tail, tm=terms, p=phys, m=mult: decode_tk.launch_decode(
                          q, k, v, table, lens, o, c, sm_scale=d ** -0.5, rule=StopRule("calibrated", 16, delta=1e-9),
                          tail_lse=t, bound_terms=tm, num_splits=S * m, out_dtype=q.dtype, phys=p, block_pages=8)))
        cases.append((dict(case=f"dense, natural order, {S * mult} splits", block_pages=16),
                      lambda m=mult: decode_tk.launch_decode(q, k, v, table, lens, None, None, sm_scale=d ** -0.5,
                                                             natural=True, num_splits=S * m, out_dtype=q.dtype,
                                                             block_pages=16)))
    return cases


TUNE_BLOCKS = (2, 4, 8, 16)


def record_tuning(rows, q, k, S, gpu):
    """The fastest BLOCK_PAGES of the tune rows, per kind, into kernels/paged_decode/tuned.json."""
    from composable_kv.kernels.page_score.triton import _pow2
    from composable_kv.kernels.paged_decode import tuning
    entries = {}
    for kind in ("dense", "art"):
        mine = [r for r in rows if r.get("tune") == kind]
        if mine:
            best = min(mine, key=lambda r: r["us"])
            key = tuning.key(_pow2(k.shape[-1], 16), k.element_size(), PAGE, S > 1, kind == "art")
            entries[key] = best["block_pages"]
    mine = [r for r in rows if r.get("tune") == "art-order"]
    if mine:
        entries[tuning.key(_pow2(k.shape[-1], 16), k.element_size(), PAGE, S > 1, True) + "/order"] = \
            min(mine, key=lambda r: r["us"])["order"]
    tuning.record(gpu, entries)
    print(f"recorded in {tuning.TUNED}: {gpu}: {entries}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--parts", default="dense,pipeline,select,quest_decode",
                    help="comma-separated, of: " + ",".join(PARTS))
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="head shape of art_decode (default llama-8b) and select (default: its Llama cases)")
    ap.add_argument("--batch", type=int, default=None, help="batch of art_decode (default 16) and select")
    ap.add_argument("--ctx", type=int, default=None,
                    help="context of art_decode (default 32768) and select, tokens (a multiple of 16)")
    ap.add_argument("--budget-pages", type=int, default=128, help="select's Quest budget, pages")
    ap.add_argument("--tune", action="store_true",
                    help="art_decode: record the fastest BLOCK_PAGES (dense, dense + ART) for this GPU in "
                         "kernels/paged_decode/tuned.json, which launch_decode then uses")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        ap.error(f"unknown part(s) {','.join(sorted(parts - set(PARTS)))}; parts: {','.join(PARTS)}")
    if (args.batch is not None and args.batch < 1) or (args.ctx is not None and (args.ctx < PAGE or args.ctx % PAGE)):
        ap.error(f"--batch must be >= 1 and --ctx a positive multiple of {PAGE}")
    if args.budget_pages < 1:
        ap.error("--budget-pages must be >= 1")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    name = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []

    def emit(**r):
        r["gpu"] = name
        rows.append(r)
        print(",".join(f"{k}={v}" for k, v in r.items()), flush=True)

    llama, small = (HQ, HKV, D), (9, 3, 64)
    if "dense" in parts:
        for (hq, hkv, d), B, ctx in ((llama, 8, 8192), (small, 32, 8192), (llama, 32, 8192), (small, 64, 32768)):
            q, k, v, table, lens, kmin, kmax = make(B, ctx, hq=hq, hkv=hkv, d=d)
            kv_bytes = 2 * B * ctx * hkv * d * 2
            fi = flashinfer_decode(q, k, v, table, lens)
            fig = flashinfer_decode(q, k, v, table, lens, graph=True)
            if fi is not None:
                t = bench(fi)
                emit(op="dense_flashinfer", hq=hq, B=B, ctx=ctx, us=round(t, 1), TBps=round(kv_bytes / t / 1e6, 3),
                     graph_us=round(bench_graph(fig) or -1, 1), host_us=round(_host_us(fi), 1))
            work = B * hkv
            split_opts = sorted({1, max(1, -(-sms // work)), max(1, -(-2 * sms // work)), max(1, -(-4 * sms // work))})
            grid = itertools.product([8, 16], [4, 8], [2, 3], split_opts)
            if args.quick:
                grid = itertools.product([8, 16], [4], [3], split_opts)
            for bp, nw, ns, S in grid:
                def run():
                    return decode_tk.launch_decode(q, k, v, table, lens, None, None, sm_scale=d ** -0.5,
                                                   natural=True, num_splits=S, out_dtype=q.dtype, block_pages=bp,
                                                   num_warps=nw, num_stages=ns)
                try:
                    t = bench(run)
                    tg = bench_graph(run)
                except Exception as e:  # noqa: BLE001 (out of shared memory etc.)
                    print("skip", bp, nw, ns, S, type(e).__name__, file=sys.stderr)
                    continue
                emit(op="dense_triton", hq=hq, B=B, ctx=ctx, block_pages=bp, num_warps=nw, num_stages=ns, splits=S,
                     us=round(t, 1), graph_us=round(tg or -1, 1), TBps=round(kv_bytes / (tg or t) / 1e6, 3))
            del q, k, v, table, kmin, kmax
            torch.cuda.empty_cache()
    if "pipeline" in parts:
        for (hq, hkv, d), B, ctx in ((llama, 8, 8192), (small, 32, 8192), (llama, 64, 32768)):
            for pol in ("configs/dense.yaml", "configs/quest.yaml", "configs/quest_art.yaml"):
                run, pipe = _pipeline_case(pol, B, ctx, hq, hkv, d)
                emit(op="pipeline", policy=pol, hq=hq, B=B, ctx=ctx, splits=pipe._plan.num_splits,
                     us=round(bench(run), 1), graph_us=round(bench_graph(run) or -1, 1), host_us=round(_host_us(run), 1))
                del run, pipe
                torch.cuda.empty_cache()
    if "host_profile" in parts:  # where an eager pipeline.run spends its host time
        import cProfile
        import pstats
        for pol in ("configs/dense.yaml", "configs/quest_art.yaml"):
            run, pipe = _pipeline_case(pol, 8, 8192, HQ, HKV, D)
            for _ in range(20):
                run()
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(300):
                run()
            prof.disable()
            torch.cuda.synchronize()
            print(f"== host profile {pol} (300 calls)")
            pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    if "select" in parts:
        # Quest's launch 1: score + select, the same certified (its tail LSE), and score only (it keeps just the
        # forced page): the difference of the first and the last is the selection. select_sweep adds block / warps / stages and the
        # scoring slices per row (score_splits; default: about 4 programs per SM).
        for shape, B, ctx in select_cases(args):
            hq, hkv, d = SHAPES[shape]
            budget = args.budget_pages
            q, k, v, table, lens, kmin, kmax = make(B, ctx, hq=hq, hkv=hkv, d=d)
            P = ctx // PAGE
            forced = torch.zeros(B, P, dtype=torch.bool, device="cuda")
            forced[:, -1] = True
            summ = 2 * B * hkv * P * d * kmin.element_size()
            grid = [dict(block_s=bs, num_warps=nw, num_stages=ns)
                    for bs, nw, ns in itertools.product([32, 64, 128, 256], [4, 8], [2, 3, 4])]
            grid += [dict(score_splits=sp) for sp in (1, 2, 4, 8, 16, 32)]
            if "select_sweep" not in parts:
                grid = [{}]  # the defaults only
            for cert, sel in ((False, True), (True, True), (False, False)):
                for kw in (grid if sel and not cert else [{}]):
                    def fn():
                        return select_tk.score_select(
                            q, kmin, kmax, table, lens, forced, num_kv_heads=hkv, page_size=PAGE, sm_scale=d ** -0.5,
                            score=1, select=sel, budget_pages=budget, forced_only=not sel, certified=cert,
                            num_splits=1, max_kept=budget, **kw)
                    try:
                        fn()  # allocates the arrival counters before a capture
                        tg = bench_graph(fn)
                        t = tg if tg is not None else bench(fn)
                    except Exception as e:  # noqa: BLE001
                        print("skip select", kw, type(e).__name__, e, file=sys.stderr)
                        continue
                    emit(op="quest_score_select" if sel else "quest_score_only", shape=shape, B=B, ctx=ctx,
                         budget_pages=budget, certified=cert, **kw, us=round(t, 1),
                         timer="graph" if tg is not None else "eager", summary_TBps=round(summ / t / 1e6, 3))
            del q, k, v, table, kmin, kmax
            torch.cuda.empty_cache()
    if "quest_decode" in parts:
        from composable_kv.stages import StopRule
        B, ctx = 64, 32768
        q, k, v, table, lens, kmin, kmax = make(B, ctx)
        P = ctx // PAGE
        forced = torch.zeros(B, P, dtype=torch.bool, device="cuda")
        forced[:, -1] = True
        o2, c2, t2 = select_tk.score_select(
            q, kmin, kmax, table, lens, forced, num_kv_heads=HKV, page_size=PAGE, sm_scale=D ** -0.5,
            score=1, select=True, budget_pages=128, forced_only=False, certified=True, num_splits=1, max_kept=128)
        for rule_kind, chunk in ((None, 0), ("certified", 4), ("certified", 8), ("certified", 16), ("stability", 8)):
            rule = StopRule(kind=rule_kind, chunk_pages=chunk, delta=0.01) if rule_kind else None
            for bp, nw, ns in itertools.product([4, 8, 16], [4, 8], [3]):
                if rule_kind and chunk % bp:
                    continue
                def dec():
                    return decode_tk.launch_decode(q, k, v, table, lens, o2, c2, sm_scale=D ** -0.5, rule=rule,
                                                   tail_lse=t2, num_splits=1, out_dtype=q.dtype, block_pages=bp,
                                                   num_warps=nw, num_stages=ns)
                try:
                    t = bench(dec)
                except Exception as e:  # noqa: BLE001
                    print("skip decode", rule_kind, chunk, bp, nw, ns, type(e).__name__, file=sys.stderr)
                    continue
                pages = dec()[1].sum().item()
                emit(op=f"quest2048_decode_{rule_kind}", B=B, ctx=ctx, chunk=chunk, block_pages=bp, num_warps=nw,
                     num_stages=ns, us=round(t, 1), pages_read=pages, TBps=round(pages * PAGE * D * 4 / t / 1e6, 3))
    if "art_decode" in parts:
        shape = args.shape or "llama-8b"
        hq, hkv, d = SHAPES[shape]
        B, ctx = args.batch or 16, args.ctx or 32768
        q, k, v, table, lens, kmin, kmax = make(B, ctx, hq=hq, hkv=hkv, d=d)
        S = splits_for(B * hkv, ctx // PAGE, sms)  # as the pipeline splits this batch
        page_bytes = 2 * PAGE * d * k.element_size()  # K and V of one page of one KV head
        table_rows, base = [], None
        for labels, fn in art_decode_cases(q, k, v, table, lens, kmin, kmax, S) + \
                art_split_cases(q, k, v, table, lens, kmin, kmax, S):
            try:
                res = fn()
                pages = int(res[1].sum()) if isinstance(res, tuple) else B * hkv * (ctx // PAGE)  # FlashInfer: all
                tg = bench_graph(fn)
                t = tg if tg is not None else bench(fn)
            except Exception as e:  # noqa: BLE001 (out of shared memory etc.)
                print("skip", labels, type(e).__name__, e, file=sys.stderr)
                continue
            base = base or t  # the first row: dense
            r = dict(op="art_decode", shape=shape, B=B, ctx=ctx, splits=S, **labels, us=round(t, 1),
                     timer="graph" if tg is not None else "eager", pages_read=pages,
                     GBps=round(pages * page_bytes / t / 1e3, 1), vs_dense=round(t / base, 2))
            emit(**r)
            table_rows.append({"chunk": "-", "block_pages": "auto", "num_stages": "auto", **r})
        if args.tune:
            record_tuning(rows, q, k, S, name)
        print(f"\n{name}, {shape} (Hq {hq}, Hkv {hkv}, D {d}), B {B}, ctx {ctx}, {S} splits; "
              f"auto: launch_decode's default\n")
        print(harness.markdown_table(table_rows, ["case", "chunk", "block_pages", "num_stages", "us", "timer",
                                                  "pages_read", "GBps", "vs_dense"]))
        for within in (False, True):  # launch 1 of dense + ART: one global sort, or each split its own pages
            fn = lambda w=within: art_order(q, table, lens, kmin, kmax, S, w)  # noqa: E731
            tg = bench_graph(fn)
            t = tg if tg is not None else bench(fn)
            emit(op="art_order", shape=shape, B=B, ctx=ctx, splits=S,
                 order="split-local" if within else "global", us=round(t, 1),
                 timer="graph" if tg is not None else "eager", vs_dense=round(t / base, 2) if base else None)
        del q, k, v, table, kmin, kmax
        torch.cuda.empty_cache()
    if args.out:
        keys = sorted({k for r in rows for k in r})
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
