"""The decode runtime on the CPU: the device-planned step equals the host-planned one; sliding-window
layers read exactly their window; unsupported attention features are refused before any work."""
import pytest
import torch

pytest.importorskip("transformers")
from helpers import tiny_llama  # noqa: E402

import composable_kv as ckv  # noqa: E402
from composable_kv import hf  # noqa: E402
from composable_kv.runtime import DecodePathError, window_decode, window_prefill  # noqa: E402

pytestmark = [pytest.mark.cpu, pytest.mark.usefixtures("one_torch_thread")]

STACKS = {
    "dense": {"page_size": 8, "stages": [{"stage": "attend"}]},
    "quest_art": {"page_size": 8, "dense_layers": [0], "stages": [
        {"stage": "sink_window", "sink_tokens": 8, "window_tokens": 8},
        {"stage": "quest", "budget_tokens": 24}, {"stage": "art", "stop": "certified", "delta": 0.05,
                                                  "chunk_pages": 1}]},
    "topk_stability": {"page_size": 8, "stages": [
        {"stage": "topk", "budget_tokens": 16}, {"stage": "art", "stop": "stability", "chunk_pages": 1,
                                                 "patience": 1, "scale_tol": 1e-2, "direction_tol": 1e-2}]},
}
PROMPT_LENGTHS = (5, 23, 23, 40)  # ragged, with one run of equal lengths (prefilled as one batch)


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_llama(256)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, 96, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_device_step_equals_host_step(tiny_model, prompts, stack):
    """Same tokens, logits and read statistics whether the plan is built on the host or on the device."""
    pipe = ckv.compile({"name": stack, **STACKS[stack]}, backend="reference")
    outs = {}
    for path in ("host", "device"):
        s = hf.PolicySession(tiny_model, pipe, max_total_tokens=60, batch_size=len(prompts), decode_path=path)
        assert s.decode_path == path and f"decode path: {path}" in s.describe()
        logits = s.prefill(prompts)
        rows = []
        for _ in range(12):
            logits = s.decode(logits.argmax(-1))
            rows.append(logits)
        outs[path] = (torch.stack(rows), s.steps)
        s.close()
    torch.testing.assert_close(outs["device"][0], outs["host"][0], atol=1e-5, rtol=1e-5)
    assert outs["device"][1] == outs["host"][1]
    if stack != "dense":  # the sparse stacks read less than every page at some step
        assert any(r < d for st in outs["host"][1] for r, d in zip(st.kv_bytes_read, st.dense_kv_bytes))


def test_generate_reports_its_path_and_keeps_eos_semantics(tiny_model, prompts):
    pipe = ckv.compile({"name": "dense", **STACKS["dense"]}, backend="reference")
    host = hf.generate(tiny_model, None, prompts, pipe, max_new_tokens=10, stop_at_eos=False, decode_path="host")
    dev = hf.generate(tiny_model, None, prompts, pipe, max_new_tokens=10, stop_at_eos=False)
    assert dev.decode_path == "device" and host.decode_path == "host"
    assert dev.sequences == host.sequences and all(len(s) == 10 for s in dev.sequences)
    # make the second prompt's 3rd token an EOS: it stops there (EOS kept), the others run on
    tiny_model.generation_config.eos_token_id = dev.sequences[1][2]
    try:
        eos = hf.generate(tiny_model, None, prompts, pipe, max_new_tokens=10)
    finally:
        tiny_model.generation_config.eos_token_id = None
    tok = dev.sequences[1][2]
    for full, got in zip(dev.sequences, eos.sequences):
        cut = full.index(tok) + 1 if tok in full else len(full)
        assert got == full[:cut]


def test_decode_paths_refused_with_one_line_errors(tiny_model):
    with pytest.raises(DecodePathError, match="needs a CUDA model"):
        hf.PolicySession(tiny_model, "configs/dense.yaml", max_total_tokens=32, batch_size=1, decode_path="graph")
    from host_seed_reference import host_pipeline  # ltri's host implementation: graph_support NEVER
    host_ltri = host_pipeline(ckv.compile("configs/ltri.yaml"))
    with pytest.raises(DecodePathError, match="syncs with the host"):
        hf.PolicySession(tiny_model, host_ltri, max_total_tokens=32, batch_size=1, decode_path="device")
    with pytest.raises(DecodePathError, match="expected one of"):
        hf.PolicySession(tiny_model, "configs/dense.yaml", max_total_tokens=32, batch_size=1, decode_path="fast")
    s = hf.PolicySession(tiny_model, host_ltri, max_total_tokens=32, batch_size=1)
    assert s.decode_path == "host" and "ltri" in s.decode_path_reason
    s = hf.PolicySession(tiny_model, "configs/ltri.yaml", max_total_tokens=32, batch_size=1)
    assert s.decode_path == "device"  # graph-safe: on CUDA it would be "graph"


def test_session_capacity_is_checked(tiny_model):
    pipe = ckv.compile({"name": "dense", **STACKS["dense"]}, backend="reference")
    s = hf.PolicySession(tiny_model, pipe, max_total_tokens=8, batch_size=1)
    with pytest.raises(hf.ContextTooLongError, match="max_total_tokens=8"):
        s.prefill([[1] * 8])
    s = hf.PolicySession(tiny_model, pipe, max_total_tokens=8, batch_size=1)
    logits = s.prefill([[1] * 6])
    logits = s.decode(logits.argmax(-1))
    s.decode(logits.argmax(-1))
    with pytest.raises(hf.ContextTooLongError, match="built for max_total_tokens=8"):
        s.decode(logits.argmax(-1))


# ---------------------------------------------------------------- sliding windows

def _tiny(family: str, window: int):
    import transformers as tr
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.2,
                  eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    if family == "mistral":  # every layer windowed
        return tr.MistralForCausalLM(tr.MistralConfig(sliding_window=window, **common)).eval()
    if family == "qwen2":  # layers >= max_window_layers windowed
        return tr.Qwen2ForCausalLM(tr.Qwen2Config(use_sliding_window=True, sliding_window=window,
                                                  max_window_layers=1, **common)).eval()
    if family == "gemma3":  # windowed and full layers interleaved
        cfg = tr.Gemma3TextConfig(sliding_window=window, layer_types=["sliding_attention", "full_attention",
                                                                      "sliding_attention"], **common)
        return tr.Gemma3ForCausalLM(cfg).eval()
    raise ValueError(family)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma3"])
@pytest.mark.parametrize("path", ["host", "device"])
def test_sliding_window_models_match_transformers_greedy(family, path):
    window, n = 12, 16
    model = _tiny(family, window)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 96, (m,), generator=g).tolist() for m in (30, 41)]  # both longer than the window
    pipe = ckv.compile({"name": "dense", **STACKS["dense"]}, backend="reference")
    ours = hf.generate(model, None, prompts, pipe, max_new_tokens=n, stop_at_eos=False, decode_path=path)
    model.set_attn_implementation("sdpa")
    for prompt, got in zip(prompts, ours.sequences):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)[0, len(prompt):].tolist()
        assert got == ref
    # windowed layers read only their window: fewer bytes than a dense read of every page
    st = ours.steps[-1]
    assert all(r < d for r, d in zip(st.kv_bytes_read, st.dense_kv_bytes))


def test_window_kernels_equal_masked_attention():
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D, W = 2, 4, 2, 37, 8, 10
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (Hq, Hkv, Hkv))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - W),
                                                           enable_gqa=True)
    torch.testing.assert_close(window_prefill(q, k, v, W, None, chunk=8), ref, atol=1e-5, rtol=1e-5)
    # decode: the last query over a paged copy of the keys
    S = 4
    pages = -(-T // S)
    kp = torch.zeros(B * pages, Hkv, S, D)
    vp = torch.zeros_like(kp)
    table = torch.arange(B * pages, dtype=torch.int32).view(B, pages).flip(1).contiguous()  # out of order
    for b in range(B):
        for t in range(T):
            kp[table[b, t // S], :, t % S] = k[b, :, t]
            vp[table[b, t // S], :, t % S] = v[b, :, t]
    lens = torch.tensor([T, T - 5], dtype=torch.int32)
    out = window_decode(q[:, :, -1], kp, vp, table, lens, W, D ** -0.5)
    torch.testing.assert_close(out[0], ref[0, :, -1], atol=1e-5, rtol=1e-5)
    b1 = torch.nn.functional.scaled_dot_product_attention(q[1:, :, -1:], k[1:, :, T - 5 - W:T - 5],
                                                          v[1:, :, T - 5 - W:T - 5], enable_gqa=True)
    torch.testing.assert_close(out[1], b1[0, :, 0], atol=1e-5, rtol=1e-5)


def test_softcapping_and_sinks_refused_before_any_work():
    import transformers as tr
    cfg = tr.Gemma2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_logit_softcapping=50.0)
    model = tr.Gemma2ForCausalLM(cfg).eval()
    with pytest.raises(hf.UnsupportedModelError, match="soft-capping"):
        hf.PolicySession(model, "configs/dense.yaml", max_total_tokens=32, batch_size=1)
    model = tiny_llama(64)
    model.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(hf.UnsupportedModelError, match="sinks"):
        hf.generate(model, None, [[1, 2, 3]], "configs/dense.yaml", max_new_tokens=2)
