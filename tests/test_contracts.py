"""Tensor contracts at the public boundary: every bad input gets a TensorContractError (or the error
named below) saying what was expected and what was found, or a documented, tested behaviour.
RELIABILITY.md lists these inputs and what they get."""
import copy
import math

import pytest
import torch

import composable_kv as ckv
from composable_kv.errors import TensorContractError as TCE

pytestmark = pytest.mark.cpu
L, HKV, D, PAGE = 2, 2, 16, 4
POLICY = {"name": "qa", "page_size": PAGE, "dense_layers": [0],
          "stages": [{"stage": "quest", "budget_tokens": 8}, {"stage": "art", "stop": "certified", "delta": 0.05,
                                                               "chunk_pages": 1}]}


def make(lens=(5, 9), validate=None, dtype=torch.float32, backend="reference", seed=0):
    pipe = ckv.compile(POLICY, backend=backend, validate=validate)
    cache = ckv.PagedKVCache(L, HKV, D, 16, page_size=PAGE, dtype=dtype, summaries=pipe.required_summaries,
                             validate=validate)
    g = torch.Generator().manual_seed(seed)
    ids = []
    for n in lens:
        sid = cache.add_sequence()
        cache.append([sid], [n], torch.randn(L, n, HKV, D, generator=g).to(dtype),
                     torch.randn(L, n, HKV, D, generator=g).to(dtype))
        ids.append(sid)
    pipe.plan(cache, ids)
    q = torch.randn(len(lens), 2 * HKV, D, generator=g).to(dtype)
    return pipe, cache, ids, q


def with_nan(t, idx, value=float("nan")):
    t = t.clone()
    t[idx] = value
    return t


# -- pipeline.run ---------------------------------------------------------------------------------
RUN_BAD = {
    "q_list": (lambda q: q.tolist(), {}, "q expected a torch.Tensor, got list"),
    "q_float64": (lambda q: q.double(), {}, r"dtype is torch.float64, expected one of"),
    "q_int32": (lambda q: q.int(), {}, r"dtype is torch.int32, expected one of"),
    "q_2d": (lambda q: q.flatten(1), {}, r"q: expected \[B=2, Hq, D=16\], got \[2, 64\]"),
    "q_batch": (lambda q: torch.cat([q, q]), {}, r"q: expected \[B=2, Hq, D=16\], got \[4, 4, 16\]"),
    "q_head_dim": (lambda q: q[..., :8], {}, r"expected \[B=2, Hq, D=16\], got \[2, 4, 8\]"),
    "q_heads_not_multiple": (lambda q: q[:, :3], {}, "3 query heads is not a multiple of the cache's 2 KV heads"),
    "q_zero_heads": (lambda q: q[:, :0], {}, "0 query heads"),
    "q_other_device": (lambda q: q.to("meta"), {}, "q is on meta but the cache is on cpu"),
    "layer_out_of_range": (lambda q: q, {"layer": 2}, r"expected 0 <= layer < 2, got 2"),
    "layer_negative": (lambda q: q, {"layer": -1}, r"expected 0 <= layer < 2, got -1"),
    "layer_float": (lambda q: q, {"layer": 1.0}, "layer expected an int, got 1.0"),
    "layer_bool": (lambda q: q, {"layer": True}, "layer expected an int, got True"),
    "sm_scale_zero": (lambda q: q, {"sm_scale": 0.0}, "sm_scale expected a finite float > 0"),
    "sm_scale_negative": (lambda q: q, {"sm_scale": -0.25}, "sm_scale expected a finite float > 0"),
    "sm_scale_nan": (lambda q: q, {"sm_scale": math.nan}, "sm_scale expected a finite float > 0"),
    "sm_scale_inf": (lambda q: q, {"sm_scale": math.inf}, "sm_scale expected a finite float > 0"),
    "sm_scale_str": (lambda q: q, {"sm_scale": "0.25"}, "sm_scale expected a finite float > 0"),
    "q_nan": (lambda q: with_nan(q, (1, 2, 3)), {},
              r"q holds 1 non-finite values \(NaN first at \[b=1, head=2, d=3\]\)"),
    "q_inf": (lambda q: with_nan(q, (0, 0, 0), float("inf")), {}, r"q holds 1 non-finite values \(Inf first"),
}


@pytest.mark.parametrize("name", RUN_BAD)
def test_run_refuses(name):
    pipe, cache, _, q = make()
    bad_q, kw, match = RUN_BAD[name]
    with pytest.raises(TCE, match=match):
        pipe.run(bad_q(q), cache, kw.get("layer", 1), sm_scale=kw.get("sm_scale"))


def test_run_before_plan_is_refused():
    pipe = ckv.compile(POLICY, backend="reference")
    _, cache, _, q = make()
    with pytest.raises(RuntimeError, match=r"call pipeline.plan\(cache, seq_ids\) once per decode step"):
        pipe.run(q, cache, 1)


def test_non_contiguous_q_is_accepted_and_equal():
    """Documented: any strides are fine (the Triton path copies q when its last dim is strided)."""
    pipe, cache, _, q = make()
    strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, stride(-1) != 1
    assert strided.stride(-1) != 1
    for layer in range(L):
        torch.testing.assert_close(pipe.run(strided, cache, layer).out, pipe.run(q, cache, layer).out)


def test_fp32_q_on_a_16bit_cache_is_accepted():
    """Documented: q may differ from the cache dtype; the kernels then use fp32 dots; out has q's dtype."""
    pipe, cache, _, q = make(dtype=torch.bfloat16)
    out = pipe.run(q.float(), cache, 1).out
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


# -- pipeline.plan --------------------------------------------------------------------------------
PLAN_BAD = {
    "cache_not_a_cache": (lambda c, ids: ({"k": []}, ids, None), "cache expected a PagedKVCache, got dict"),
    "seq_ids_empty": (lambda c, ids: (c, [], None), "seq_ids is empty"),
    "seq_ids_unknown": (lambda c, ids: (c, ids + [99], None), r"seq_ids\[2\] = 99 is not in the cache"),
    "seq_ids_int": (lambda c, ids: (c, 0, None), "seq_ids expected a list of sequence ids, got int"),
    "seq_ids_float": (lambda c, ids: (c, [0.0], None), r"seq_ids\[0\] expected an int, got 0.0"),
    "num_splits_zero": (lambda c, ids: (c, ids, 0), r"num_splits expected an int in \[1, inf\), got 0"),
    "num_splits_float": (lambda c, ids: (c, ids, 2.0), "num_splits expected an int, got 2.0"),
}


@pytest.mark.parametrize("name", PLAN_BAD)
def test_plan_refuses(name):
    pipe, cache, ids, _ = make()
    args, match = PLAN_BAD[name]
    c, s, n = args(cache, ids)
    with pytest.raises(TCE, match=match):
        pipe.plan(c, s, num_splits=n)


def test_plan_refuses_a_cache_built_for_another_policy():
    pipe, _, ids, _ = make()
    other = ckv.PagedKVCache(L, HKV, D, 16, page_size=8, dtype=torch.float32, summaries=pipe.required_summaries)
    other.add_sequence()
    with pytest.raises(TCE, match="cache.page_size is 8 but policy 'qa' has page_size 4"):
        pipe.plan(other, [0])
    bare = ckv.PagedKVCache(L, HKV, D, 16, page_size=PAGE, dtype=torch.float32)
    bare.add_sequence()
    with pytest.raises(TCE, match="needs page summaries"):
        pipe.plan(bare, [0])


# -- the cache --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, "float16"])
def test_cache_refuses_non_float_dtypes(dtype):
    with pytest.raises(TCE, match="dtype expected one of"):
        ckv.PagedKVCache(L, HKV, D, 4, page_size=PAGE, dtype=dtype)


def snapshot(c):
    return (copy.deepcopy((c._free, c._pages, c._len)),
            [t.clone().view(torch.uint8) for name in ("k", "v", "key_min", "key_max", "value_norm")
             for t in (getattr(c, name) or [])])


def same(a, b):
    return a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def kv(n, dtype=torch.float32):
    return torch.randn(L, n, HKV, D).to(dtype), torch.randn(L, n, HKV, D).to(dtype)


APPEND_BAD = {
    "k_too_few_tokens": (lambda k, v: (k[:, :2], v), r"append: k expected shape \[num_layers=2, T=sum\(counts\)=3, "
                                                     r"Hkv=2, D=16\], got \[2, 2, 2, 16\]"),
    "v_wrong_head_dim": (lambda k, v: (k, v[..., :8]), r"append: v expected shape .*got \[2, 3, 2, 8\]"),
    "k_missing_layer_axis": (lambda k, v: (k[0], v[0]), r"append: k expected shape .*got \[3, 2, 16\]"),
    "k_wrong_dtype": (lambda k, v: (k.half(), v), r"append: k dtype is torch.float16, expected torch.float32"),
    "v_other_device": (lambda k, v: (k, v.to("meta")), "append: v is on meta, expected cpu"),
    "k_not_a_tensor": (lambda k, v: (k.tolist(), v), "append: k expected a torch.Tensor, got list"),
    "k_nan": (lambda k, v: (with_nan(k, (1, 2, 0, 5)), v),
              r"append: k holds 1 non-finite values \(NaN first at \[layer=1, token=2, head=0, d=5\]\)"),
    "v_inf": (lambda k, v: (k, with_nan(v, (0, 0, 1, 1), -float("inf"))), r"append: v holds 1 non-finite values \(Inf"),
}


@pytest.mark.parametrize("name", APPEND_BAD)
def test_append_refuses_and_changes_nothing(name):
    _, cache, ids, _ = make()
    before = snapshot(cache)
    bad, match = APPEND_BAD[name]
    with pytest.raises(TCE, match=match):
        cache.append([ids[0]], [3], *bad(*kv(3)))
    assert same(before, snapshot(cache)), "a refused append changed the cache"


WRITE_BAD = {
    "layer_str": (lambda k, v: ("0", k, v), "write: layer expected an int, got '0'"),
    "v_nan": (lambda k, v: (0, k, with_nan(v, (2, 1, 0))), r"write: v holds 1 non-finite values \(NaN first at "
                                                          r"\[token=2, head=1, d=0\]\)"),
    "k_none": (lambda k, v: (0, None, v), "write: k expected a torch.Tensor, got NoneType"),
}


@pytest.mark.parametrize("name", WRITE_BAD)
def test_write_refuses(name):
    _, cache, ids, _ = make()
    slots = cache.reserve([ids[1]], [3])
    k, v = kv(3)
    bad, match = WRITE_BAD[name]
    layer, bk, bv = bad(k[0], v[0])
    before = snapshot(cache)
    with pytest.raises(TCE, match=match):
        cache.write(layer, slots, bk, bv)
    assert same(before, snapshot(cache))


def test_non_contiguous_kv_is_accepted():
    _, cache, ids, _ = make()
    k, v = kv(3)
    kt = k.transpose(2, 3).contiguous().transpose(2, 3)
    cache.append([ids[0]], [3], kt, v)
    gk, _ = cache.gather(1, ids[0])
    assert torch.equal(gk[-3:], k[1])


def test_value_checks_follow_the_flag_and_env(monkeypatch):
    """validate=False (the CUDA default) does not look at values; CKV_VALIDATE=0/1 overrides the default."""
    _, cache, ids, q = make(validate=False)
    k, v = kv(2)
    cache.append([ids[0]], [2], with_nan(k, (0, 0, 0, 0)), v)  # accepted, no sync
    monkeypatch.setenv("CKV_VALIDATE", "0")
    c = ckv.PagedKVCache(L, HKV, D, 4, page_size=PAGE, dtype=torch.float32)
    c.append([c.add_sequence()], [2], with_nan(k, (0, 0, 0, 0)), v)
    monkeypatch.setenv("CKV_VALIDATE", "1")
    c = ckv.PagedKVCache(L, HKV, D, 4, page_size=PAGE, dtype=torch.float32)
    with pytest.raises(TCE, match="non-finite"):
        c.append([c.add_sequence()], [2], with_nan(k, (0, 0, 0, 0)), v)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unchecked_nan_stays_in_its_request(backend):
    """Documented: with value checks off, a NaN key makes only its own request's output unspecified (the
    reference propagates NaN; the Triton kernels may drop the token); other requests are unaffected."""
    pipe, cache, ids, q = make(lens=(5, 9, 13), validate=False, backend=backend)
    clean = [pipe.run(q, cache, layer).out for layer in range(L)]
    k, v = kv(1)
    cache.append([ids[1]], [1], with_nan(k, (slice(None), 0, 0, 3)), v)
    pipe.plan(cache, ids)
    for layer in range(L):
        out = pipe.run(q, cache, layer).out
        if backend == "reference":
            assert not bool(torch.isfinite(out[1]).all())
        torch.testing.assert_close(out[[0, 2]], clean[layer][[0, 2]])


# -- hf.generate ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=64, eos_token_id=None, bos_token_id=None,
                                   pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


DENSE = {"name": "d", "page_size": 16, "stages": [{"stage": "attend"}]}
GEN_BAD = {
    "token_past_vocab": (dict(prompts=[[1, 2, 64]]), TCE, r"prompts\[0\]\[2\] = 64 is outside the vocabulary \[0, 64\)"),
    "token_negative": (dict(prompts=[[3], [1, -1]]), TCE, r"prompts\[1\]\[1\] = -1 is outside the vocabulary"),
    "max_new_tokens_str": (dict(max_new_tokens="3"), TCE, "max_new_tokens expected an int, got '3'"),
    "max_new_tokens_zero": (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
    "no_prompts": (dict(prompts=[]), ValueError, "prompts is empty"),
    "empty_prompt": (dict(prompts=[[1, 2], []]), ValueError, "Every prompt needs at least one token"),
    "text_without_tokenizer": (dict(prompts=["hello"]), ValueError, "Text prompts need a tokenizer"),
    "too_long": (dict(prompts=[[1] * 60], max_new_tokens=8), ckv.CkvError, "exceeds the model's maximum context"),
    "bad_policy": (dict(policy={"stages": [{"stage": "quets"}]}), ckv.ConfigError, r"stages\[0\].stage: unknown stage"),
}


@pytest.mark.parametrize("name", GEN_BAD)
def test_generate_refuses(tiny_model, name):
    from composable_kv import hf
    kw, err, match = GEN_BAD[name]
    args = dict(prompts=[[1, 2, 3]], policy=DENSE, max_new_tokens=2) | kw
    with pytest.raises(err, match=match):
        hf.generate(tiny_model, None, args.pop("prompts"), stop_at_eos=False, **args)
