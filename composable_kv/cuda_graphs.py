"""CUDA-graph capture and host-time measurement shared by the benchmark, the tuning sweep and the long run."""
import time

import torch


def capture(fn):
    """Run fn once on a side stream (allocator and lazy-init warm-up), then capture one call of it in a
    CUDA graph. Returns (graph, what the captured call returned: tensors that each replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def host_us(fn, n: int = 50) -> float:
    """Host time per call of fn with no sync in between (what the CPU spends launching), microseconds."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host
