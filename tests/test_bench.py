"""Benchmark plumbing without a GPU: trace tiling, byte accounting, writers, CLI errors."""
import argparse
import math

import pytest
import torch

import layer_bench as bench  # benchmarks/ is on the test path (pyproject.toml)
from composable_kv import traces
from layer_bench import Case, Row

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def trace():
    return traces.Trace.synthetic(layers=4, kv_heads=3, group=3, tokens=128, head_dim=64, num_queries=4)


# -- trace replay ---------------------------------------------------------------------------------

def test_native_shape_uses_the_trace_as_is(trace):
    rep = traces.TraceReplayer(trace, num_q_heads=9, num_kv_heads=3, head_dim=64, ctx=128)
    assert rep.native
    q, k, v = rep.request(5)  # layer 5 % 4 = 1, query slot (5 // 4) % 4 = 1
    assert torch.equal(q, trace.q[1, 1]) and torch.equal(k, trace.k[1]) and torch.equal(v, trace.v[1])


@pytest.mark.parametrize("ctx", [48, 128, 300, 512])
def test_llama_shapes(trace, ctx):
    q, k, v = traces.build_batch(trace, 3, num_q_heads=32, num_kv_heads=8, head_dim=128, ctx=ctx)
    assert q.shape == (3, 32, 128) and k.shape == (3, 8, ctx, 128) and v.shape == (3, 8, ctx, 128)
    assert q.dtype == k.dtype == torch.bfloat16


def test_concatenated_head_logits_are_scaled_sums_of_real_logits(trace):
    rep = traces.TraceReplayer(trace, num_q_heads=32, num_kv_heads=8, head_dim=128, ctx=128)
    r = 6
    q, k, _ = rep.request(r)
    (s0, s1) = traces.head_sources(r, 8, 2, 12)[0]
    (l0, h0), (l1, h1) = divmod(s0, 3), divmod(s1, 3)
    slot = (r // 4) % 4
    real = (trace.q[l0, slot, h0 * 3].float() @ trace.k[l0, h0].float().T
            + trace.q[l1, slot, h1 * 3 + 1].float() @ trace.k[l1, h1].float().T) / 8
    ours = q[0].float() @ k[0].float().T / math.sqrt(128)
    torch.testing.assert_close(ours, real / math.sqrt(2), atol=1e-4, rtol=1e-4)


def test_long_context_keeps_relative_positions_of_the_last_copy(trace):
    k4, v4 = traces.expand_context(trace.k, trace.v, 4 * 128, trace.inv_freq)
    assert k4.shape[-2] == 512
    assert torch.equal(k4[..., -128:, :], trace.k) and torch.equal(v4[..., -128:, :], trace.v)
    assert torch.equal(v4[..., :128, :], trace.v)
    # the oldest copy is the trace rotated back by 3*T positions: un-rotating recovers it
    back = traces.rope_shift(k4[..., :128, :].float(), 3 * 128, trace.inv_freq)
    torch.testing.assert_close(back, trace.k.float(), atol=0.05, rtol=0.02)


def test_rope_shift_preserves_dot_products_under_a_common_shift(trace):
    k, q = trace.k[0, 0].float(), trace.q[0, 0, 0].float()
    a = traces.rope_shift(k, 777, trace.inv_freq) @ traces.rope_shift(q, 777, trace.inv_freq)
    torch.testing.assert_close(a, k @ q, atol=1e-3, rtol=1e-4)


def test_shape_errors(trace):
    with pytest.raises(ValueError, match="head_dim"):
        traces.TraceReplayer(trace, num_q_heads=32, num_kv_heads=8, head_dim=96, ctx=64)
    with pytest.raises(ValueError, match="ctx"):
        traces.TraceReplayer(trace, num_q_heads=9, num_kv_heads=3, head_dim=64, ctx=0)


def test_load_trace_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckv trace"):
        traces.load_trace(tmp_path / "nope.pt")


def test_trace_roundtrip(tmp_path, trace):
    p = tmp_path / "t.pt"
    torch.save({"q": trace.q, "k": trace.k, "v": trace.v, "inv_freq": trace.inv_freq, "meta": trace.meta}, p)
    t2 = traces.load_trace(p)
    assert torch.equal(t2.k, trace.k) and t2.tokens == 128 and t2.group == 3


# -- case data on the CPU -------------------------------------------------------------------------

def test_case_data_fills_the_paged_cache_and_summaries(trace, monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny", (8, 2, 128))
    data = bench.CaseData(trace, Case("tiny", 3, 256, ()), "cpu")
    rep = traces.TraceReplayer(trace, num_q_heads=8, num_kv_heads=2, head_dim=128, ctx=256)
    for b in range(3):
        k, v = data.cache.gather(0, data.seq_ids[b])  # [T, Hkv, D]
        _, rk, rv = rep.request(b)
        assert torch.equal(k.transpose(0, 1), rk) and torch.equal(v.transpose(0, 1), rv)
    kc = data.cache.k[0]
    assert torch.equal(data.cache.key_min[0], kc.amin(2)) and torch.equal(data.cache.key_max[0], kc.amax(2))
    ck, cv = data.contiguous_kv()
    assert ck.shape == (3, 2, 256, 128)
    ref = data.reference()
    assert ref.shape == (3, 8, 128) and torch.isfinite(ref).all()


def test_fi_quest_indices_address_the_head_major_view():
    B, hkv, P = 2, 3, 5
    table = torch.arange(B * P, dtype=torch.int32).view(B, P).flip(-1)  # physical ids
    order = torch.tensor([[[4, 0, -1], [1, 2, -1], [3, 3, -1]], [[0, 1, -1], [2, 4, -1], [4, 0, -1]]])
    idx = bench.fi_quest_indices(table, order, 2).view(B, hkv, 2)
    for b in range(B):
        for h in range(hkv):
            for i in range(2):
                assert idx[b, h, i] == table[b, order[b, h, i]] * hkv + h
    # the view [pages*Hkv, 1, S, D] row p*Hkv + h is page p, head h of the HND cache
    cache = torch.randn(B * P, hkv, 4, 8)
    view = cache.view(-1, 1, 4, 8)
    assert torch.equal(view[int(idx[1, 2, 0]), 0], cache[int(table[1, 4]), 2])


# -- accounting and writers -----------------------------------------------------------------------

def test_byte_accounting():
    # Llama-8B, B=64, 32k: 8 GiB of K/V; summaries 1/8 of the keys' bytes (2 vectors per 16 tokens)
    assert bench.dense_bytes(64, 8, 128, 32768) == 64 * 8 * 32768 * 2 * 128 * 2 == 8 * 2 ** 30
    assert bench.kv_bytes(64, 8, 128, 2048) == bench.dense_bytes(64, 8, 128, 32768)
    assert bench.kv_bytes(64, 8, 128, 128) == bench.dense_bytes(64, 8, 128, 2048)
    assert bench.summary_bytes(64, 8, 128, 2048) == bench.dense_bytes(64, 8, 128, 32768) / 16
    assert bench.case_bytes(Case("llama3-8b", 64, 32768, ("fi_dense", "sdpa"))) == 16 * 2 ** 30
    assert bench.case_bytes(Case("llama3-8b", 64, 32768, ("fi_dense",))) == 8 * 2 ** 30


def _rows():
    base = dict(shape="llama3-8b", hq=32, hkv=8, head_dim=128, batch=64, ctx=32768, dense_pages_per_head=2048)
    return [
        Row(**base, provider="fi_dense", ms=3.0, speedup_vs_fi_dense=1.0, graph_ms=2.9,
            graph_speedup_vs_fi_dense=1.0, gbps=2860, pages_per_head=2048),
        Row(**base, provider="ckv_dense", ms=3.1, speedup_vs_fi_dense=3.0 / 3.1, pages_per_head=2048),
        Row(**base, provider="fi_quest", budget=2048, ms=0.6, speedup_vs_fi_dense=5.0, rel_err_vs_dense=0.02),
        Row(**base, provider="ckv_quest_art", budget=2048, ms=0.4, speedup_vs_fi_dense=7.5, graph_ms=0.38,
            graph_speedup_vs_fi_dense=2.9 / 0.38, host_us=120.0, pages_per_head=60.5,
            rel_err_vs_dense=0.021, rel_err_vs_quest=0.004, note="fused"),
        Row(**base, provider="quest_select", budget=2048, ms=0.2,
            note="fused.select_pages; summary read at FI-dense BW 0.1875 ms; ratio=1.07"),
        Row(**base, provider="ckv_swqa", budget=1024, note="failed: RuntimeError: x"),
    ]


def test_csv_roundtrip(tmp_path):
    rows = _rows()
    p = tmp_path / "sub" / "r.csv"
    bench.write_csv(rows, p, {"gpu": "NVIDIA H100", "commit": "abc123"})
    text = p.read_text().splitlines()
    assert text[0].startswith("gpu,commit,shape,")
    assert text[1].startswith("NVIDIA H100,abc123,llama3-8b,")
    back = bench.read_csv(p)
    assert len(back) == len(rows)
    assert back[3].ms == 0.4 and back[3].budget == 2048 and back[3].note == "fused"
    assert math.isnan(back[5].ms) and back[5].note.startswith("failed")


def test_markdown_and_targets(tmp_path):
    rows = _rows()
    lines = bench.targets(rows)
    p = tmp_path / "B.md"
    bench.write_markdown(rows, p, {"gpu": "NVIDIA H100 80GB HBM3", "commit": "abc123", "command": "ckv bench"})
    md = p.read_text()
    assert "NVIDIA H100 80GB HBM3" in md and "`abc123`" in md and "`ckv bench`" in md
    assert md.count("\n| llama3-8b |") == len(rows)
    assert "| ckv_quest_art | 2048 | 0.380 | 7.63 | 0.400 | 7.50 | 120 |" in md


def test_targets_judged_on_graph_times():
    rows = _rows()
    slow = rows[1]  # ckv_dense: fast on the GPU, slow eager (host launch cost)
    slow.ms, slow.speedup_vs_fi_dense, slow.graph_ms, slow.graph_speedup_vs_fi_dense = 6.0, 0.5, 2.8, 2.9 / 2.8
    line = bench.targets(rows)[0]
    assert "**met** (CUDA graphs)" in line and "1.04x" in line and "Eager (host launch cost included): 0.50-0.50x" in line
    slow.graph_speedup_vs_fi_dense = 0.8
    assert "**NOT met**" in bench.targets(rows)[0]


def test_targets_judgement():
    lines = bench.targets(_rows())
    assert lines[0].startswith("1.") and "**met**" in lines[0]
    assert "**met**" in lines[1] and "1.07x" in lines[1]
    assert "**met**" in lines[2] and "7.63x with CUDA graphs" in lines[2] and "7.50x eager" in lines[2]
    assert "**met**" in lines[3] and "1.58x" in lines[3]  # graph time 0.38 ms vs fi_quest's eager 0.6 ms
    assert "not measured" in bench.targets([])[2]
    assert "reference shape" not in lines[1]  # the rows are B=64
    rows = _rows()
    rows[4].batch = 32
    assert "reference shape (Llama-3-8B, B=32, 32k): 1.07-1.07x" in bench.targets(rows)[1]


# -- CLI --------------------------------------------------------------------------------------------

def _parse(argv):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    bench.add_bench_parser(sub)
    return p.parse_args(["bench"] + argv)


@pytest.mark.parametrize("argv, msg", [
    (["--shapes", "gpt5"], "unknown shape"),
    (["--batches", "x"], "comma-separated"),
    (["--batches", "0"], "positive"),
    (["--contexts", "33"], "multiples of 16"),
    (["--contexts", "abc"], "token counts"),
    (["--budgets", "100"], "multiples of 16"),
    (["--providers", "vllm"], "unknown provider"),
    (["--warmup-ms", "0"], "warmup"),
])
def test_cli_argument_errors(argv, msg, capsys):
    args = _parse(argv)
    assert args.func(args) == 2
    assert msg in capsys.readouterr().err


def test_cli_explicit_grid_adds_the_baseline():
    grid = bench.parse_grid_args(_parse(["--batches", "8,32", "--contexts", "8k,32768", "--providers", "ckv_quest"]))
    assert [(c.batch, c.ctx) for c in grid] == [(8, 8192), (32, 8192), (8, 32768), (32, 32768)]
    assert grid[0].providers == ("fi_dense", "ckv_quest") and grid[0].budgets == (2048,)


def test_default_grid_covers_the_required_rows():
    grid = bench.default_grid()
    dense = {(c.batch, c.ctx) for c in grid if c.shape == "llama3-8b" and "ckv_dense" in c.providers}
    assert {(b, c) for b in (8, 32, 64, 128) for c in (8192, 32768)} <= dense
    sparse = [c for c in grid if c.shape == "llama3-8b" and c.ctx == 32768 and "fi_quest" in c.providers]
    assert {c.batch for c in sparse} == {32, 64} and all(c.budgets == (1024, 2048, 4096) for c in sparse)
    assert any(c.shape == "smollm2-135m" for c in grid)


def test_cli_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    args = _parse(["--quick"])
    assert args.func(args) == 2
    assert "CUDA" in capsys.readouterr().err


def test_trace_cli_argument_errors(capsys):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    traces.add_trace_parser(sub)
    args = p.parse_args(["trace", "--layers", "a,b"])
    assert args.func(args) == 2
    assert "--layers" in capsys.readouterr().err
    args = p.parse_args(["trace", "--tokens", "4"])
    assert args.func(args) == 2


def test_from_csv_rewrites_the_markdown_without_a_gpu(tmp_path):
    csv_path = tmp_path / "r.csv"
    meta = {"gpu": "NVIDIA H100 80GB HBM3", "commit": "abc123", "command": "ckv bench"}
    bench.write_csv(_rows(), csv_path, meta)
    assert bench.meta_path(csv_path).is_file()
    notes = tmp_path / "notes.md"
    notes.write_text("## Analysis\n\nhand-written\n")
    md = tmp_path / "B.md"
    args = _parse(["--from-csv", str(csv_path), "--out-md", str(md), "--notes", str(notes)])
    assert args.func(args) == 0
    text = md.read_text()
    assert "NVIDIA H100 80GB HBM3" in text and "hand-written" in text and "| ckv_quest_art |" in text
    args = _parse(["--from-csv", str(tmp_path / "missing.csv")])
    assert args.func(args) == 2


def test_forward_with_hook_sees_every_layer_then_restores_attention():
    """traces.forward_with_hook: exact causal attention, the hook sees each layer's post-RoPE q/k/v."""
    pytest.importorskip("transformers")
    from helpers import tiny_llama

    model = tiny_llama(64)
    ids = torch.randint(1, 96, (1, 20), generator=torch.Generator().manual_seed(0))
    seen = {}
    traces.forward_with_hook(model, ids, lambda li, q, k, v, s: seen.__setitem__(li, (q.shape, k.shape, s)))
    assert sorted(seen) == [0, 1, 2]
    assert seen[0] == ((1, 4, 20, 16), (1, 2, 20, 16), 16 ** -0.5)
    assert model.config._attn_implementation != "ckv_capture"  # switched back


# -- the shared harness (benchmarks/harness.py) ---------------------------------------------------

def test_report_writer_keeps_rows_and_meta(tmp_path, monkeypatch):
    import json

    import harness
    monkeypatch.setenv("CKV_COMMIT", "abc1234")
    meta = harness.run_meta("python benchmarks/x.py --flag", steps=3)
    assert meta["commit"] == "abc1234" and meta["steps"] == 3 and meta["command"].endswith("--flag")
    rows = [{"provider": "ckv dense", "tok_s": 12.5}, {"provider": "ckv quest", "tok_s": 20.0}]
    js, md = harness.write_report(tmp_path / "out", "e2e", meta, rows, "| a |\n|---|\n| 1 |", title="T")
    saved = json.loads(js.read_text())
    assert saved["rows"] == rows and saved["meta"]["commit"] == "abc1234"
    text = md.read_text()
    assert text.startswith("# T\n") and "- commit: `abc1234`" in text and "`python benchmarks/x.py --flag`" in text
    assert text.rstrip().endswith("| 1 |")


def test_git_commit_without_override_names_head(monkeypatch):
    import subprocess

    import harness
    monkeypatch.delenv("CKV_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=harness.REPO, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert harness.git_commit().split("+")[0] == head.stdout.strip()



def test_one_timer_and_one_flashinfer_wrapper():
    """Every benchmark times and builds FlashInfer through the harness: no second do_bench or wrapper."""
    from pathlib import Path

    import harness
    for path in sorted(Path(harness.__file__).parent.glob("*.py")):
        if path.name == "harness.py":
            continue
        text = path.read_text()
        assert "do_bench(" not in text, f"{path.name} times with its own do_bench; use harness.median_ms"
        assert "Event(enable_timing" not in text, f"{path.name} times with its own CUDA events; use the harness"
        assert "BatchDecodeWithPagedKVCacheWrapper(" not in text, f"{path.name} builds its own FlashInfer wrapper"
        assert "def copy_bandwidth" not in text, f"{path.name} measures bandwidth itself; use harness.copy_bandwidth"


def test_e2e_prompts_from_text_are_windows_of_it():
    import e2e
    text = list(range(1000, 1025))  # 25 "token ids"
    prompts = e2e.make_prompts(3, 10, 100, text)
    assert [len(p) for p in prompts] == [10, 10, 10]
    assert prompts[0] == text[:10] and prompts[1] == text[8:18]
    assert prompts[2] == text[16:] + text[:1]  # wraps around the corpus
    long = e2e.make_prompts(2, 60, 100, text)  # longer than the corpus: repeats it
    assert [len(p) for p in long] == [60, 60] and long[0][25:50] == text
    rand = e2e.make_prompts(2, 7, 50, None)
    assert all(len(p) == 7 and all(10 <= t < 50 for t in p) for p in rand)


def test_e2e_runs_the_real_prefill_for_policies_that_observe_it():
    """Synthetic K/V cannot stand in for ltri's or the predictor's prefill: the session would record every layer's
    K/V beside its cache (the 8B shape at B=16, 32k ran out of memory so)."""
    import e2e
    from composable_kv.config import shipped_configs_dir
    assert e2e.observes_prefill(str(shipped_configs_dir() / "ltri.yaml"))
    assert e2e.observes_prefill(str(shipped_configs_dir() / "attention_predictor.yaml"))
    assert not e2e.observes_prefill(str(shipped_configs_dir() / "quest.yaml"))
    assert not e2e.observes_prefill(e2e.POLICIES["ckv quest+art"])


def test_e2e_providers_take_policy_yaml_and_refuse_unknown_ones(tmp_path, capsys):
    import e2e
    assert e2e.provider_policy("ckv configs/quest_art.yaml") == "configs/quest_art.yaml"
    assert e2e.provider_policy("flashinfer-tc") == e2e.POLICIES["ckv dense"]
    assert e2e.provider_policy("ckv quest") == e2e.POLICIES["ckv quest"]
    for bad, says in (("ckv missing.yaml", "names no file"), ("ckv questt", "unknown")):
        with pytest.raises(SystemExit) as e:
            e2e.main(["--out", str(tmp_path), "--providers", bad])
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_kernel_sweep_art_decode_options(monkeypatch, capsys):
    """kernel_sweep's art_decode options parse; bad ones, and a missing GPU, exit 2 before any work."""
    import kernel_sweep
    assert kernel_sweep.splits_for(16 * 2, 32768 // 16, 132) == 9  # Qwen-0.5B, B=16, 32k on an H200
    assert kernel_sweep.splits_for(64 * 8, 2048, 132) == 1 and kernel_sweep.splits_for(1 * 2, 20, 132) == 1
    monkeypatch.setattr(kernel_sweep, "make", lambda *a, **k: pytest.fail("main built a cache"))
    for argv, says in ((["--shape", "gpt5"], "invalid choice: 'gpt5'"), (["--parts", "art_decod"], "unknown part"),
                       (["--ctx", "100"], "multiple of 16"), (["--batch", "0"], "--batch")):
        with pytest.raises(SystemExit) as e:
            kernel_sweep.main(["--parts", "art_decode", *argv])
        assert e.value.code == 2 and says in capsys.readouterr().err, argv
    if torch.cuda.is_available():
        pytest.skip("has a GPU: main would run the part")
    with pytest.raises(SystemExit) as e:
        kernel_sweep.main(["--parts", "art_decode", "--shape", "qwen-0.5b", "--batch", "2", "--ctx", "256"])
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith("error: needs a CUDA GPU")


def test_kernel_sweep_select_cases_and_budget():
    """The select part times its three Llama cases, or the one shape --shape/--batch/--ctx name; bad budgets exit 2."""
    import kernel_sweep
    from types import SimpleNamespace as NS
    assert kernel_sweep.select_cases(NS(shape=None, batch=None, ctx=None)) == [
        ("llama-8b", 32, 32768), ("llama-8b", 64, 32768), ("llama-8b", 8, 131072)]
    assert kernel_sweep.select_cases(NS(shape="qwen-0.5b", batch=None, ctx=None)) == [("qwen-0.5b", 16, 32768)]
    assert kernel_sweep.select_cases(NS(shape=None, batch=64, ctx=16384)) == [("qwen-0.5b", 64, 16384)]
    with pytest.raises(SystemExit) as e:
        kernel_sweep.main(["--parts", "select", "--budget-pages", "0"])
    assert e.value.code == 2
