"""Fused decode layers (composable_kv.decoder): the ops against their references, the fused step against
transformers' modules on tiny random Llama / Mistral / Qwen2 models, and the choice of layers."""
import os

import pytest
import torch

pytest.importorskip("transformers")
from helpers import tiny_llama  # noqa: E402
from tiny_families import tiny_family  # noqa: E402

import composable_kv as ckv  # noqa: E402
from composable_kv import hf  # noqa: E402
from composable_kv.decoder import DecodeLayersError, FusedDecoder, choose_layers  # noqa: E402
from composable_kv.kernels.decoder_ops import reference as ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = DEV == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="no CUDA and TRITON_INTERPRET unset")
pytestmark = [pytest.mark.usefixtures("one_torch_thread")]

DENSE = {"name": "dense", "page_size": 8, "stages": [{"stage": "attend"}]}
QUEST_ART = {"name": "quest_art", "page_size": 8, "dense_layers": [0], "stages": [
    {"stage": "sink_window", "sink_tokens": 8, "window_tokens": 8}, {"stage": "quest", "budget_tokens": 24},
    {"stage": "art", "stop": "certified", "delta": 0.05, "chunk_pages": 1}]}


def _close(a, b, dtype):
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]  # bf16: 2 ulps
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


# ---------------------------------------------------------------- ops: Triton vs reference

@needs_triton
@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 96])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm(dtype, hidden, with_delta):
    from composable_kv.kernels.decoder_ops import triton as tk
    g = torch.Generator().manual_seed(hidden)
    res = (torch.randn(5, hidden, generator=g) * 3).to(DEV, dtype)
    delta = torch.randn(5, hidden, generator=g).to(DEV, dtype) if with_delta else None
    w = torch.randn(hidden, generator=g).to(DEV, dtype)
    r_ref, r_tk = res.clone(), res.clone()
    out_ref = ref.add_rms_norm(r_ref, delta, w, 1e-6)
    out_tk = tk.add_rms_norm(r_tk, delta, w, 1e-6)
    if DEV == "cuda" or dtype == torch.float32:  # the residual add rounds once, as torch's
        assert torch.equal(r_tk, r_ref)
    else:  # Triton's interpreter truncates float -> bf16 instead of rounding to nearest
        _close(r_tk, r_ref, dtype)
    _close(out_tk, out_ref, dtype)


@needs_triton
@pytest.mark.interpret
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.float16)])
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (3, 1, 64), (2, 2, 8)])
@pytest.mark.parametrize("summaries", [(), ("minmax",), ("minmax", "vnorm")])
def test_rope_write(dtype, cache_dtype, hq, hkv, d, summaries):
    from composable_kv.kernels.decoder_ops import triton as tk
    g = torch.Generator().manual_seed(hq * 100 + d)
    B, N, S = 3, 7, 4
    q, k, v = (torch.randn(B, h * d, generator=g).to(DEV, dtype) for h in (hq, hkv, hkv))
    ang = torch.rand(B, d // 2, generator=g) * 6
    cos, sin = (torch.cat([f(ang), f(ang)], -1).to(DEV, dtype) for f in (torch.cos, torch.sin))
    pages = torch.tensor([5, 0, 3], device=DEV)
    offs = torch.tensor([1, 3, 0], device=DEV)

    def state():
        gg = torch.Generator().manual_seed(1)
        kp, vp = (torch.randn(N, hkv, S, d, generator=gg).to(DEV, cache_dtype) for _ in range(2))
        kmin = torch.randn(N, hkv, d, generator=gg).to(DEV, cache_dtype) if "minmax" in summaries else None
        kmax = (kmin + 1) if kmin is not None else None
        vn = torch.rand(N, hkv, generator=gg).to(DEV) * 4 if "vnorm" in summaries else None
        return kp, vp, kmin, kmax, vn

    s_ref, s_tk = state(), state()
    q_ref = ref.rope_write(q, k, v, cos, sin, s_ref[0], s_ref[1], pages, offs, *s_ref[2:])
    q_tk = tk.rope_write(q, k, v, cos, sin, s_tk[0], s_tk[1], pages, offs, *s_tk[2:])
    _close(q_tk, q_ref, dtype)
    for a, b in zip(s_tk, s_ref):
        if a is not None:
            _close(a, b, cache_dtype)
    # and the reference itself does what it says: slot holds the rotated key, summaries bound it
    kp = s_ref[0]
    assert torch.equal(kp[5, :, 1], ref._rotate(k.view(B, hkv, d), cos[:, None], sin[:, None])[0].to(cache_dtype))
    if s_ref[2] is not None:  # the written keys lie inside their pages' new min/max box
        written = kp[pages, :, offs]  # [B, Hkv, D]
        assert bool((s_ref[2][pages] <= written).all()) and bool((s_ref[3][pages] >= written).all())


@needs_triton
@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (3, 1, 64), (2, 2, 8)])
def test_rope(dtype, hq, hkv, d):
    """Rotary alone (what a cache that writes K/V itself gets) == the reference == rope_write's rotation."""
    from composable_kv.kernels.decoder_ops import triton as tk
    g = torch.Generator().manual_seed(hq * 10 + d)
    B = 3
    q, k, v = (torch.randn(B, h * d, generator=g).to(DEV, dtype) for h in (hq, hkv, hkv))
    ang = torch.rand(B, d // 2, generator=g) * 6
    cos, sin = (torch.cat([f(ang), f(ang)], -1).to(DEV, dtype) for f in (torch.cos, torch.sin))
    q_ref, k_ref = ref.rope(q, k, cos, sin)
    q_tk, k_tk = tk.rope(q, k, cos, sin)
    assert q_tk.shape == (B, hq, d) and k_tk.shape == (B, hkv, d)
    _close(q_tk, q_ref, dtype)
    _close(k_tk, k_ref, dtype)
    kp, vp = (torch.zeros(4, hkv, 2, d, dtype=dtype, device=DEV) for _ in range(2))
    pages, offs = torch.tensor([2, 0, 3], device=DEV), torch.tensor([1, 0, 1], device=DEV)
    assert torch.equal(ref.rope_write(q, k, v, cos, sin, kp, vp, pages, offs), q_ref)
    assert torch.equal(kp[pages, :, offs], k_ref)
    with pytest.raises(ValueError, match="share a dtype"):
        tk.rope(q, k.double(), cos, sin)


@needs_triton
@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [128, 1500])
def test_silu_mul(dtype, n):
    from composable_kv.kernels.decoder_ops import triton as tk
    g = torch.Generator().manual_seed(n)
    gate, up = (torch.randn(3, n, generator=g).to(DEV, dtype) * 4 for _ in range(2))
    _close(tk.silu_mul(gate, up), ref.silu_mul(gate, up), dtype)


# ---------------------------------------------------------------- the fused step vs transformers' modules

def _decode_rows(model, policy, prompts, layers, steps=10, path="device", keep=None):
    s = hf.PolicySession(model, policy, max_total_tokens=max(map(len, prompts)) + steps + 1,
                         batch_size=len(prompts), decode_path=path, layers=layers)
    assert s.layers == layers and f"decode layers: {layers}" in s.describe()
    logits = s.prefill(prompts)
    rows = []
    for _ in range(steps):
        logits = s.decode(logits.argmax(-1))
        rows.append(logits)
    stats = s.steps
    if keep is not None:
        keep.append(s.cache)
    s.close()
    return torch.stack(rows), stats


PATHS = ["host", "device"] + (["graph"] if DEV == "cuda" else [])


@pytest.mark.cpu
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("policy", ["dense", "quest_art"])
@pytest.mark.parametrize("path", PATHS)
def test_fused_step_equals_modules(family, policy, path):
    """Same logits, greedy tokens and read statistics as the model's own modules (fp32; on CUDA also
    captured in the decode step's graph)."""
    model = tiny_family(family).to(DEV)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (30, 19, 41)]
    pipe = ckv.compile(DENSE if policy == "dense" else QUEST_ART, backend="reference" if DEV == "cpu" else "auto")
    fused, fused_steps = _decode_rows(model, pipe, prompts, "fused", path=path)
    mods, mod_steps = _decode_rows(model, pipe, prompts, "modules", path=path)
    torch.testing.assert_close(fused, mods, atol=1e-4, rtol=1e-4)
    assert torch.equal(fused.argmax(-1), mods.argmax(-1))
    assert fused_steps == mod_steps


@pytest.mark.gpu
def test_fused_graph_bf16_agreement():
    """bf16 on the GPU, teacher-forced on the same tokens: the fused graph step's logits against the modules'.

    Both round in bf16, in different GEMM groupings, so they agree to bf16 precision, not bit for bit."""
    model = tiny_family("qwen2").to(DEV, torch.bfloat16)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (40, 40, 33, 50)]
    feed = torch.randint(1, 96, (24, len(prompts)), generator=g).to(DEV)  # [steps, B]
    pipe = ckv.compile(QUEST_ART)
    rows = {}
    for layers in ("fused", "modules"):
        s = hf.PolicySession(model, pipe, max_total_tokens=80, batch_size=len(prompts), layers=layers)
        s.prefill(prompts)
        rows[layers] = torch.stack([s.decode(t).clone() for t in feed])  # [steps, B, V]
        s.close()
    a, b = rows["fused"], rows["modules"]
    scale = b.abs().amax()
    err = (a - b).abs().amax() / scale
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"bf16 fused vs modules, teacher-forced: max |diff| / max |logit| = {err:.4f}, top-1 equal {top1:.3f}")
    assert err < 0.05 and top1 >= 0.9


@pytest.mark.cpu
def test_fused_step_keeps_shadow_summaries():
    """A key-shadow cache is re-quantized after the fused write, as after cache.write."""
    model = tiny_llama(256)
    pipe = ckv.compile({**QUEST_ART, "stages": [{"stage": "quest", "budget_tokens": 24},
                                                {"stage": "key_shadow", "bits": 8, "budget_tokens": 16},
                                                {"stage": "art", "stop": "certified", "delta": 0.05}]},
                       backend="reference")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (70, 90)]
    caches = []
    fused, fs = _decode_rows(model, pipe, prompts, "fused", steps=6, keep=caches)
    mods, ms = _decode_rows(model, pipe, prompts, "modules", steps=6, keep=caches)
    torch.testing.assert_close(fused, mods, atol=1e-4, rtol=1e-4)
    assert fs == ms
    for layer in range(3):
        assert torch.equal(caches[0].shadow_codes[8][layer], caches[1].shadow_codes[8][layer])


@pytest.mark.cpu
def test_layers_choice_and_errors():
    model = tiny_llama(64)
    assert choose_layers("auto", model, torch.device("cpu"))[0] == "modules"
    assert choose_layers("auto", model, torch.device("cuda"))[0] == "fused"
    with pytest.raises(DecodeLayersError, match="layers: expected one of"):
        choose_layers("fast", model, torch.device("cpu"))
    s = hf.PolicySession(model, "configs/dense.yaml", max_total_tokens=32, batch_size=1, layers="fused")
    assert "decode layers: fused (asked for); K/V write: rope_write" in s.describe()
    import transformers as tr
    gemma = tr.Gemma3ForCausalLM(tr.Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16)).eval()
    with pytest.raises(DecodeLayersError, match="gemma3.*use layers='modules'"):
        hf.PolicySession(gemma, "configs/dense.yaml", max_total_tokens=32, batch_size=1, layers="fused")
    s = hf.PolicySession(gemma, "configs/dense.yaml", max_total_tokens=32, batch_size=1)
    assert s.layers == "modules" and "gemma3" in s.layers_reason


@pytest.mark.cpu
def test_fused_layers_read_the_models_own_weights():
    """Nothing is copied; an unsharded model is world size 1: no shard group, no all-reduce
    (2 sharded ranks: tests/test_tp.py)."""
    model = tiny_family("qwen2")
    dec = FusedDecoder(model)
    assert dec.group is None
    a, m = model.model.layers[1].self_attn, model.model.layers[1].mlp
    w, b = dec.layers[1].proj["q"]
    assert w is a.q_proj.weight and b is a.q_proj.bias  # Qwen2: q/k/v biases
    assert dec.layers[1].proj["o"][0] is a.o_proj.weight and dec.layers[1].proj["down"][0] is m.down_proj.weight
