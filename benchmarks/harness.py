"""What every benchmark shares: one timer, one FlashInfer decode wrapper, one report writer.

Benchmarks run as scripts (`python benchmarks/<name>.py`), so this folder is on sys.path and they
`import harness`; tests get it from pyproject's pythonpath.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
GRAPH_CALLS = 20  # calls per captured CUDA graph when timing replays


# -- timer ----------------------------------------------------------------------------------------

def median_ms(fn, warmup_ms: int = 25, rep_ms: int = 100, *, calls: int | None = None) -> float:
    """Median GPU time of one call of fn, in ms (triton's do_bench: warm-up, L2 flush, CUDA events).
    calls=N: exactly N timed calls (after 5 warm-ups), each between two CUDA events, for fn that
    changes state (a cache write) and must run a known number of times. Without CUDA (a benchmark's
    CPU dry run): the median wall time of the calls."""
    if calls is not None or not torch.cuda.is_available():
        n = calls if calls is not None else 10
        for _ in range(5 if calls is not None else 1):
            fn()
        return statistics.median(_event_ms(fn) for _ in range(n))
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _event_ms(fn) -> float:
    if not torch.cuda.is_available():
        return wall_ms(fn)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def wall_ms(fn, calls: int = 1) -> float:
    """Wall time per call of `calls` calls of fn, device work included (end-to-end steps, whole generations)."""
    _sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync()
    return (time.perf_counter() - t0) / calls * 1e3


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def graph_ms(fn, warmup_ms: int = 25, rep_ms: int = 100, calls: int = GRAPH_CALLS) -> float:
    """ms per call of fn replayed from one CUDA graph of `calls` calls (no host launch cost).
    Raises what capture raises: the caller says why there is no graph time."""
    from composable_kv.cuda_graphs import capture
    graph, _ = capture(lambda: [fn() for _ in range(calls)])
    return median_ms(graph.replay, warmup_ms, rep_ms) / calls


def copy_bandwidth(device="cuda", nbytes: int = 4 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), measured now: the floor's denominator."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    ms = wall_ms(lambda: y.copy_(x), calls=10)
    del x, y
    return 2 * nbytes / (ms * 1e-3)


def compile_report(kernel, signature: dict, constexprs: dict, *, arch: int, num_warps: int, name: str) -> str:
    """Compile a Triton kernel for an NVIDIA target without a GPU (Triton's bundled ptxas; the caller unsets
    TRITON_INTERPRET before triton is imported) and report its mma instructions, local-memory traffic,
    shared memory, and registers/stack from cuobjdump: a check that it compiles well, not a timing."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(kernel.arg_names.index(c),): v for c, v in constexprs.items()})
    cc = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    ptx = cc.asm["ptx"]
    cubin = Path(tempfile.mkdtemp()) / f"{name}.cubin"
    cubin.write_bytes(cc.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)], capture_output=True, text=True).stdout
    sass = subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True).stdout
    mma = sorted(set(re.findall(r"(?:wgmma\.mma_async|mma\.sync)\S*", ptx)))
    return "\n".join([f"mma: {mma or 'none'}",
                      f"local memory ops in PTX: {ptx.count('ld.local') + ptx.count('st.local')}; "
                      f"shared bytes: {cc.metadata.shared}; SASS instructions: {sass_instructions(sass)}",
                      usage.strip().splitlines()[-1].strip()])


def sass_instructions(sass: str) -> int:
    """Instructions in cuobjdump -sass text (each is listed with its /*offset*/): the code a program walks."""
    import re
    return len(re.findall(r"/\*[0-9a-f]{4,}\*/", sass))


def filled_cache(pipe, batch: int, ctx: int, num_kv_heads: int, head_dim: int, dtype, device, generator):
    """A one-layer PagedKVCache of `batch` sequences of `ctx` random tokens, with the summaries `pipe` needs,
    planned for `pipe`. -> (cache, seq_ids)."""
    from composable_kv import PagedKVCache
    cache = PagedKVCache(1, num_kv_heads, head_dim, batch * (ctx // 16 + 2), page_size=16, dtype=dtype,
                         device=device, summaries=pipe.required_summaries)
    ids = [cache.add_sequence() for _ in range(batch)]
    for sid in ids:
        k = torch.randn(1, ctx, num_kv_heads, head_dim, generator=generator, device=device).to(dtype)
        v = torch.randn(1, ctx, num_kv_heads, head_dim, generator=generator, device=device).to(dtype)
        cache.append([sid], [ctx], k, v)
    pipe.plan(cache, ids)
    return cache, ids


# -- FlashInfer -----------------------------------------------------------------------------------

def flashinfer():
    """The flashinfer module, or None when it is not installed (the caller reports the missing rows)."""
    try:
        import flashinfer as fi
        return fi
    except ImportError:
        return None


def flashinfer_decode(indptr, indices, last_page_len, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                      page_size: int, dtype, sm_scale: float | None = None, tensor_cores: bool = False,
                      graph: bool = False, workspace: torch.Tensor | None = None):
    """FlashInfer's BatchDecodeWithPagedKVCacheWrapper over an HND paged cache, planned for these index
    buffers; `graph=True` makes its CUDA-graph variant, which keeps these very buffers (they must stay alive,
    fixed in size, and be re-planned in place). Returns the wrapper: `wrapper.run(q, (k_cache, v_cache))`."""
    import flashinfer as fi
    ws = workspace if workspace is not None else torch.empty(256 << 20, dtype=torch.uint8, device=indptr.device)
    extra = dict(use_cuda_graph=True, paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices,
                 paged_kv_last_page_len_buffer=last_page_len) if graph else {}
    w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, kv_layout="HND", use_tensor_cores=tensor_cores, **extra)
    w.plan(indptr, indices, last_page_len, num_q_heads, num_kv_heads, head_dim, page_size,
           q_data_type=dtype, kv_data_type=dtype, sm_scale=sm_scale)
    return w


# -- report ---------------------------------------------------------------------------------------

def git_commit() -> str:
    """CKV_COMMIT if set (a device machine's checkout may have a stale .git), else HEAD (+dirty)."""
    if os.environ.get("CKV_COMMIT"):
        return os.environ["CKV_COMMIT"]
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True)
    except OSError:
        return "unknown"
    if c.returncode != 0:
        return "unknown"
    return c.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 (not installed, or no __version__)
        return "-"


def run_meta(command: str | None = None, **extra) -> dict:
    """Where and how a benchmark ran: device, commit, versions, date and the command line."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    meta = {"gpu": device, "commit": git_commit(), "date": datetime.date.today().isoformat(),
            "command": command or "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
            "torch": torch.__version__, "triton": version("triton"), "flashinfer": version("flashinfer"),
            "python": platform.python_version()}
    meta.update(extra)
    return meta


def meta_lines(meta: dict) -> list[str]:
    """The header every committed table carries: GPU, commit, command, versions."""
    return [f"- GPU: **{meta.get('gpu', '?')}**",
            f"- commit: `{meta.get('commit', '?')}`",
            f"- command: `{meta.get('command', '?')}`",
            f"- date: {meta.get('date', '?')}; torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, "
            f"flashinfer {meta.get('flashinfer', '?')}"]


def markdown_table(rows: list[dict], cols: list[str] | None = None) -> str:
    """rows as a markdown table (cols: which keys, in order; default: the first row's)."""
    cols = cols or list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out_dir: str | Path, stem: str, meta: dict, rows: list[dict], markdown: str,
                 title: str | None = None) -> tuple[Path, Path]:
    """`<stem>.json` (meta + rows) and `<stem>.md` (title, meta header, the markdown body) in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    js.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    head = [f"# {title}", ""] if title else []
    md.write_text("\n".join([*head, *meta_lines(meta), "", markdown.rstrip(), ""]))
    return js, md

