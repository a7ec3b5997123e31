"""Kernel timings on the GPU (Llama-8B shapes: 32 q heads, 8 KV heads, D=128, bf16, page 16).

    python -m composable_kv.kernels.bench_triton [--quick] [--out rows.csv]

Dense decode vs FlashInfer's BatchDecodeWithPagedKVCacheWrapper (when importable), with a sweep of
BLOCK pages / warps / stages / splits; Quest score+select vs the summary bytes at HBM speed; Quest-ART
decode. Random K/V: ART's stop does not fire meaningfully here (see DESIGN.md), only its cost is timed.
"""
import argparse
import csv
import itertools
import sys

import torch
import triton

from composable_kv.kernels.page_select import triton as select_tk
from composable_kv.kernels.paged_decode import triton as decode_tk

HQ, HKV, D, PAGE = 32, 8, 128, 16


def make(B, ctx, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    P = ctx // PAGE
    n = B * P
    k = torch.randn(n, HKV, PAGE, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(n, HKV, PAGE, D, device="cuda", dtype=dtype, generator=g)
    table = torch.randperm(n, device="cuda", generator=g).to(torch.int32).view(B, P)
    lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(B, HQ, D, device="cuda", dtype=dtype, generator=g)
    kmin, kmax = k.amin(2).contiguous(), k.amax(2).contiguous()
    return q, k, v, table, lens, kmin, kmax


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40) * 1e3  # us


def flashinfer_decode(q, k, v, table, lens):
    try:
        import flashinfer
    except Exception as e:  # noqa: BLE001
        print("flashinfer unavailable:", e, file=sys.stderr)
        return None
    B, P = table.shape
    indptr = torch.arange(0, B * P + 1, P, dtype=torch.int32, device="cuda")
    last = torch.full((B,), PAGE, dtype=torch.int32, device="cuda")
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "HND")
    w.plan(indptr, table.flatten(), last, HQ, HKV, D, PAGE, data_type=q.dtype, q_data_type=q.dtype)
    return lambda: w.run(q, (k, v))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    name = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []

    def emit(**r):
        r["gpu"] = name
        rows.append(r)
        print(",".join(f"{k}={v}" for k, v in r.items()), flush=True)

    shapes = [(8, 8192), (32, 8192), (8, 32768), (32, 32768), (64, 32768)]
    for B, ctx in shapes:
        q, k, v, table, lens, kmin, kmax = make(B, ctx)
        kv_bytes = 2 * B * ctx * HKV * D * 2
        fi = flashinfer_decode(q, k, v, table, lens)
        t_fi = None
        if fi is not None:
            t_fi = bench(fi)
            emit(op="dense_flashinfer", B=B, ctx=ctx, us=round(t_fi, 1), TBps=round(kv_bytes / t_fi / 1e6, 3))
        work = B * HKV
        split_opts = sorted({1, max(1, -(-2 * sms // work)), max(1, -(-sms // work)), max(1, -(-4 * sms // work))})
        grid = itertools.product([4, 8, 16], [4, 8], [2, 3], split_opts)
        if args.quick:
            grid = itertools.product([8], [4], [3], split_opts)
        best = None
        for bp, nw, ns, S in grid:
            def run():
                return decode_tk.launch_decode(q, k, v, table, lens, None, None, sm_scale=D ** -0.5, natural=True,
                                               num_splits=S, out_dtype=q.dtype, block_pages=bp, num_warps=nw,
                                               num_stages=ns)
            try:
                t = bench(run)
            except Exception as e:  # noqa: BLE001 (out of shared memory etc.)
                print("skip", bp, nw, ns, S, type(e).__name__, file=sys.stderr)
                continue
            if best is None or t < best[0]:
                best = (t, bp, nw, ns, S)
        t, bp, nw, ns, S = best
        emit(op="dense_triton_best", B=B, ctx=ctx, us=round(t, 1), TBps=round(kv_bytes / t / 1e6, 3),
             block_pages=bp, num_warps=nw, num_stages=ns, splits=S,
             vs_flashinfer=round(t_fi / t, 3) if t_fi else "")
        if (B, ctx) in ((32, 32768), (8, 32768)):
            P = ctx // PAGE
            forced = torch.zeros(B, P, dtype=torch.bool, device="cuda")
            forced[:, -1] = True
            summ = 2 * B * HKV * P * D * 2
            for budget, cert, S in ((128, False, 1), (128, True, 1), (128, True, 4)):
                def sel():
                    return select_tk.score_select(q, kmin, kmax, table, lens, forced, num_kv_heads=HKV, page_size=PAGE,
                                                  sm_scale=D ** -0.5, score=1, select=True, budget_pages=budget,
                                                  forced_only=False, certified=cert, num_splits=S, max_kept=budget)
                t = bench(sel)
                emit(op="quest_score_select", B=B, ctx=ctx, budget_pages=budget, certified=cert, splits=S,
                     us=round(t, 1), summary_TBps=round(summ / t / 1e6, 3),
                     vs_hbm_summary=round(t / (summ / 3.0e6), 2))
            order, count, tail = sel()
            from composable_kv.kernels.paged_decode.reference import StopRule
            for rule in (None, StopRule(kind="certified", chunk_pages=4, delta=0.01),
                         StopRule(kind="stability", chunk_pages=4)):
                for S2 in sorted({1, max(1, -(-2 * sms // work))}):
                    o2, c2, t2 = select_tk.score_select(
                        q, kmin, kmax, table, lens, forced, num_kv_heads=HKV, page_size=PAGE, sm_scale=D ** -0.5,
                        score=1, select=True, budget_pages=128, forced_only=False, certified=True, num_splits=S2,
                        max_kept=128)
                    def dec():
                        return decode_tk.launch_decode(q, k, v, table, lens, o2, c2, sm_scale=D ** -0.5, rule=rule,
                                                       tail_lse=t2, num_splits=S2, out_dtype=q.dtype)
                    t = bench(dec)
                    pages = dec()[1].sum().item()
                    emit(op=f"quest2048_decode_{getattr(rule, 'kind', None)}", B=B, ctx=ctx, splits=S2,
                         us=round(t, 1), pages_read=pages, TBps=round(pages * PAGE * D * 4 / t / 1e6, 3))
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
