"""The HF integration decodes exactly like transformers' own attention with a dense policy."""

import pytest
import torch

pytest.importorskip("transformers")
from helpers import tiny_llama  # noqa: E402

from composable_kv import assets, hf  # noqa: E402

pytestmark = [pytest.mark.cpu, pytest.mark.usefixtures("one_torch_thread")]

import composable_kv as ckv  # noqa: E402

DENSE16_DICT = {"name": "dense16", "page_size": 16, "stages": [{"stage": "attend"}]}
QUEST16_DICT = {"name": "quest16", "page_size": 16, "dense_layers": [0],
                "stages": [{"stage": "quest", "budget_tokens": 32}, {"stage": "attend"}]}
# The reference (pure torch) path: conftest sets TRITON_INTERPRET=1, under which backend="auto"
# would pick the (slow, interpreted) Triton kernels; those are covered by the `interpret` test below.
DENSE16 = ckv.compile(DENSE16_DICT, backend="reference")
QUEST16 = ckv.compile(QUEST16_DICT, backend="reference")
PROMPT_LENGTHS = (5, 23, 40)  # ragged: inside one page, across pages, several pages


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_llama(128)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 96, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _hf_greedy(model, prompt, n, impl):
    model.set_attn_implementation(impl)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_dense_policy_matches_transformers_greedy(tiny_model, prompts, impl):
    n = 20
    ours = hf.generate(tiny_model, None, prompts, policy=DENSE16, max_new_tokens=n, stop_at_eos=False)
    for prompt, got in zip(prompts, ours.sequences):
        assert got == _hf_greedy(tiny_model, prompt, n, impl)
    assert tiny_model.config._attn_implementation == impl  # restored after generate()


def test_dense_policy_logits_match_transformers(tiny_model, prompts):
    context, continuation = prompts[2][:30], prompts[2][30:]  # 30 + 10 tokens: decode crosses a page
    ours, steps = hf.teacher_forced_logits(tiny_model, context, continuation, DENSE16)
    ref = hf.dense_logits(tiny_model, context, continuation)
    assert ours.shape == ref.shape == (len(continuation) - 1, 96)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert len(steps) == len(continuation) - 1
    assert all(s.kv_bytes_read[0] == s.dense_kv_bytes[0] for s in steps)  # dense reads every page


def test_sparse_policy_reads_less_and_reports_stats(tiny_model, prompts):
    out = hf.generate(tiny_model, None, prompts, policy=QUEST16, max_new_tokens=8, stop_at_eos=False)
    assert [len(s) for s in out.sequences] == [8, 8, 8]
    assert len(out.steps) == 7  # the first token comes from the dense prefill
    short, _, long = out.kv_read_fraction
    assert long < 1.0  # 40+ tokens, 3 pages, 2 kept in the sparse layers
    assert all(b > 0 for b in out.kv_bytes_per_token)
    assert all(p > 0 for p in out.pages_per_token)


def test_policy_can_be_compiled_pipeline_or_shipped_name(tiny_model, prompts):
    a = hf.generate(tiny_model, None, prompts[:1], policy=DENSE16_DICT | {"name": "d"}, max_new_tokens=4,
                    stop_at_eos=False)  # a dict compiles too
    assert len(a.sequences[0]) == 4
    assert hf.compile_policy("quest").page_size == 16  # configs/quest.yaml found by name


def test_unknown_policy_file_is_a_clear_error(tiny_model, prompts):
    with pytest.raises(ckv.ConfigError, match="no_such_policy.yaml.*policy file not found.*quest_art"):
        hf.generate(tiny_model, None, prompts, policy="configs/no_such_policy.yaml", max_new_tokens=2)


def test_context_longer_than_model_max_is_a_clear_error(tiny_model):
    with pytest.raises(hf.ContextTooLongError, match="maximum context of 128"):
        hf.generate(tiny_model, None, [[1] * 120], policy=DENSE16, max_new_tokens=16)


def test_bad_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(assets.AssetError, match="no such file or folder"):
        assets.load_model(tmp_path / "missing-model")
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"x")
    with pytest.raises(assets.AssetError, match="must be a .gguf"):
        assets.load_model(bad)


def test_attention_outside_a_session_raises(tiny_model):
    hf._register_attention()
    tiny_model.set_attn_implementation(hf.ATTN_IMPLEMENTATION)
    try:
        with pytest.raises(RuntimeError, match="only works inside composable_kv.hf"):
            tiny_model(torch.tensor([[1, 2, 3]]), use_cache=False)
    finally:
        tiny_model.set_attn_implementation("sdpa")


def test_default_model_matches_transformers_if_cached():
    if not assets.default_model_cached():
        pytest.skip(f"default model not in {assets.cache_dir()} (run `ckv demo` once to fetch it)")
    model, tok = assets.load_model_and_tokenizer()
    prompt = tok("The capital of France is Paris. The capital of Italy is")["input_ids"]
    dense = ckv.compile("configs/dense.yaml", backend="reference")
    ours = hf.generate(model, tok, [prompt], policy=dense, max_new_tokens=6, stop_at_eos=False)
    assert ours.sequences[0] == _hf_greedy(model, prompt, 6, "sdpa")


def test_shared_prefill_gives_the_same_decode(tiny_model, prompts):
    shared = hf.PrefillCache()
    first = hf.generate(tiny_model, None, prompts, policy=DENSE16, max_new_tokens=6, stop_at_eos=False,
                        prefill_cache=shared)
    fresh = hf.generate(tiny_model, None, prompts, policy=QUEST16, max_new_tokens=6, stop_at_eos=False)
    replayed = hf.generate(tiny_model, None, prompts, policy=QUEST16, max_new_tokens=6, stop_at_eos=False,
                           prefill_cache=shared)
    assert shared.get(prompts) is not None
    assert replayed.sequences == fresh.sequences and first.sequences[0][0] == fresh.sequences[0][0]
    assert [s.kv_bytes_read for s in replayed.steps] == [s.kv_bytes_read for s in fresh.steps]


OBSERVERS = {  # stages that build state from the prompt's queries (observe_prefill)
    "snapkv": {"page_size": 8, "stages": [{"stage": "snapkv", "budget_tokens": 16, "window": 4},
                                          {"stage": "attend"}]},
    "attention_predictor": {"page_size": 8, "stages": [{"stage": "attention_predictor", "budget_tokens": 16,
                                                        "history_steps": 8, "calibrate_every": 4,
                                                        "calibrate_first": False, "sink_tokens": 8,
                                                        "recent_tokens": 8},
                                                       {"stage": "attend"}]},
    "ltri": {"page_size": 8, "stages": [{"stage": "ltri", "budget_tokens": 16}, {"stage": "attend"}]},
}


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_a_recorded_prefill_replays_for_stages_that_read_the_last_queries(tiny_model, prompts, name, tmp_path):
    """snapkv and attention_predictor read only the prompt's last queries: a prefill recorded under another
    policy replays for them (no model forward) and decodes exactly as a forward prefill; ltri reads every
    query, so its prefill runs the model again (and says so)."""
    from composable_kv.policies.attention_predictor.predictor import PredictorCNN, save_weights
    spec = {"name": name, **OBSERVERS[name]}
    if name == "attention_predictor":
        torch.manual_seed(0)
        spec["stages"][0]["weights"] = str(save_weights(PredictorCNN(), tmp_path / "cnn.pt"))
    pipe = ckv.compile(spec, backend="reference")
    shared = hf.PrefillCache()
    hf.generate(tiny_model, None, prompts, policy=DENSE16, max_new_tokens=2, stop_at_eos=False, prefill_cache=shared)
    fresh = hf.generate(tiny_model, None, prompts, policy=pipe, max_new_tokens=6, stop_at_eos=False)
    replayed = hf.generate(tiny_model, None, prompts, policy=pipe, max_new_tokens=6, stop_at_eos=False,
                           prefill_cache=shared)
    assert fresh.prefill_source == "forward"
    assert replayed.prefill_source == ("forward" if name == "ltri" else "replayed")
    assert replayed.sequences == fresh.sequences
    assert [s.kv_bytes_read for s in replayed.steps] == [s.kv_bytes_read for s in fresh.steps]
    assert [s.pages_read for s in replayed.steps] == [s.pages_read for s in fresh.steps]


def test_a_recorded_prefill_replays_on_a_windowed_model(prompts):
    """Qwen2 with sliding windows from layer 1: a forward observes layer 0 only, and so does a replay."""
    from tiny_families import tiny_family
    model = tiny_family("qwen2")
    pipe = ckv.compile({"name": "snapkv", **OBSERVERS["snapkv"]}, backend="reference")
    shared = hf.PrefillCache()
    hf.generate(model, None, prompts, policy=DENSE16, max_new_tokens=2, stop_at_eos=False, prefill_cache=shared)
    assert sorted(shared.get(prompts).scaling) == [0]
    fresh = hf.generate(model, None, prompts, policy=pipe, max_new_tokens=6, stop_at_eos=False)
    replayed = hf.generate(model, None, prompts, policy=pipe, max_new_tokens=6, stop_at_eos=False,
                           prefill_cache=shared)
    assert replayed.prefill_source == "replayed" and replayed.sequences == fresh.sequences
    assert [s.pages_read for s in replayed.steps] == [s.pages_read for s in fresh.steps]


@pytest.mark.interpret
def test_triton_path_decodes_like_the_reference(tiny_model, prompts):
    """The fused Triton kernels (interpreted on CPU) give the same greedy tokens as the reference."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest unless CKV_NO_INTERPRET=1)")
    triton_quest = ckv.compile(QUEST16_DICT, backend="triton")
    ref = hf.generate(tiny_model, None, prompts[1:], policy=QUEST16, max_new_tokens=3, stop_at_eos=False)
    fused = hf.generate(tiny_model, None, prompts[1:], policy=triton_quest, max_new_tokens=3, stop_at_eos=False)
    assert fused.sequences == ref.sequences
