"""Tensor parallelism on CPU: 2 gloo ranks decode the same greedy tokens as one process, through transformers'
modules and through the fused decode layers (composable_kv.decoder) on each rank's shards."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

import composable_kv as ckv  # noqa: E402
from composable_kv import hf, tp  # noqa: E402

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("dense", "quest", "quest_art")
PROMPT_LENGTHS = (5, 23, 40)  # ragged; with 4-token pages a 12-token budget keeps 3 of 10 pages
NEW_TOKENS = 10
RANKS = 2
LAYERS = ("modules", "fused")
# 8 query / 4 KV heads: each rank holds 2 KV heads of 2 query heads each.
TINY = dict(vocab_size=96, hidden_size=128, intermediate_size=192, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=4, head_dim=16, max_position_embeddings=128, initializer_range=0.2)
# and Qwen2 (tests/tiny_families.py: q/k/v biases, split with their heads; 1 KV head of 2 query heads a rank),
# its window wider than the session so that the policy selects on its layers >= 1
FAMILY_POLICIES = {"llama": POLICIES, "qwen2": ("dense", "quest_art")}
RUNS = [(f, p, layers) for f, ps in FAMILY_POLICIES.items() for p in ps for layers in LAYERS]

WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from composable_kv import decoder, hf, tp
    spec = json.load(open(sys.argv[1]))
    prompts = json.load(open(spec["prompts"]))
    runs = {}
    for family, folder in spec["models"].items():
        model = tp.load_model_tp(folder)
        for policy in spec["policies"][family]:
            for layers in ("modules", "fused"):
                out = tp.generate(model, None, prompts, policy, max_new_tokens={new}, stop_at_eos=False, layers=layers)
                runs[f"{family} {Path(policy).stem} {layers}"] = {
                    "tokens": out.sequences, "read": [s.kv_bytes_read for s in out.steps], "layers": out.decode_layers}
    runs["describe"] = hf.PolicySession(model, policy, max_total_tokens=64, batch_size=1, layers="fused").describe()
    whole_mlp = {f"model.layers.*.mlp.{m}": "replicate" for m in ("gate_proj", "up_proj", "down_proj")}
    runs["whole_mlp"] = decoder.unsupported_reason(tp.load_model_tp(spec["models"]["llama"], tp_plan=whole_mlp))
    if tp.rank() == 0:
        json.dump(runs, open(spec["out"] + ".generate", "w"))
    sys.exit(tp.main(["--model", spec["models"]["llama"], "--prompts-json", spec["prompts"], "--new-tokens", "{new}",
                      "--backend", "reference", "--warmup", "0", "--layers", "fused", "--json", spec["out"]]
                     + [a for p in spec["policies"]["llama"] for a in ("--policy", p)]))
""").replace("{new}", str(NEW_TOKENS))


def _small_policy(name: str) -> dict:
    """configs/<name>.yaml with 4-token pages and a 12-token budget, so selection drops pages."""
    d = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    d["page_size"] = 4
    if name != "dense":
        d["dense_layers"] = [0]
    for stage in d["stages"]:
        if "budget_tokens" in stage:
            stage["budget_tokens"] = 12
        if stage["stage"] == "art":
            stage["delta"] = 0.2  # loose enough that ART stops before the budget on a random model
            stage["chunk_pages"] = 1
    return d


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tiny_families import tiny_family

    tmp = tmp_path_factory.mktemp("tp")
    tp.save_random_llama(tmp / "model", **TINY)
    tiny_family("qwen2", window=128).save_pretrained(tmp / "qwen2")
    policies = {}
    for name in POLICIES:
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_small_policy(name)))
        policies[name] = path
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, TINY["vocab_size"], (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    return tmp, policies, prompts


def _launch(tmp: Path, policies: dict, timeout: float = 150.0) -> tuple[dict, dict]:
    script = tmp / "worker.py"
    script.write_text(WORKER)
    out = tmp / "tp.json"
    spec = {"models": {"llama": str(tmp / "model"), "qwen2": str(tmp / "qwen2")}, "prompts": str(tmp / "prompts.json"),
            "out": str(out), "policies": {f: [str(policies[p]) for p in ps] for f, ps in FAMILY_POLICIES.items()}}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU, like the single-process reference, even on a GPU box
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # containers whose hostname does not resolve
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}",
           str(script), str(tmp / "spec.json")]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: a hang fails instead of blocking CI
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]
    return json.loads(out.read_text()), json.loads(Path(str(out) + ".generate").read_text())


@pytest.fixture(scope="module")
def sharded(setup):
    tmp, policies, _ = setup
    return _launch(tmp, policies)


@pytest.fixture(scope="module")
def single(setup):
    """The same decodes on one process, through transformers' modules: the whole model, every head in one cache.

    (One process, fused == modules: tests/test_decoder.py.)"""
    from transformers import AutoModelForCausalLM

    tmp, policies, prompts = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for family, names in FAMILY_POLICIES.items():
            model = AutoModelForCausalLM.from_pretrained(tmp / ("model" if family == "llama" else family),
                                                         dtype=torch.float32).eval()
            for name in names:
                out = hf.generate(model, None, prompts, ckv.compile(str(policies[name]), backend="reference"),
                                  max_new_tokens=NEW_TOKENS, stop_at_eos=False, layers="modules")
                read = sum(sum(s.kv_bytes_read) for s in out.steps)
                dense = sum(sum(s.dense_kv_bytes) for s in out.steps)
                runs[f"{family} {name}"] = {"tokens": out.sequences, "fraction": read / dense,
                                            "read": [s.kv_bytes_read for s in out.steps]}
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.mark.parametrize("policy", POLICIES)
def test_sharded_tokens_equal_single_process(sharded, single, setup, policy):
    """`python -m composable_kv.tp --layers fused` on 2 ranks == transformers' modules on 1 process."""
    report, _ = sharded
    meta = report["meta"]
    assert (meta["world_size"], meta["kv_heads_per_rank"], meta["q_heads_per_rank"]) == (RANKS, 2, 4)
    result = report["results"][POLICIES.index(policy)]
    assert result["policy"] == str(setup[1][policy])
    assert result["decode_layers"] == "fused"
    one = single[f"llama {policy}"]
    assert result["tokens"] == one["tokens"]
    # Read statistics are summed over the ranks: the same pages as on one process.
    assert result["kv_read_fraction"] == pytest.approx(one["fraction"], rel=1e-9)
    if policy == "dense":
        assert result["kv_read_fraction"] == 1.0
    else:
        assert result["kv_read_fraction"] < 0.9  # selection dropped pages on each rank
    assert result["decode_tokens_per_s"] > 0


@pytest.mark.parametrize("family,policy,layers", RUNS)
def test_python_api_generate_matches_single_process(sharded, single, family, policy, layers):
    """tp.generate on 2 ranks == 1 process, for the fused layers and the modules alike (and fused == modules)."""
    _, runs = sharded
    got, one = runs[f"{family} {policy} {layers}"], single[f"{family} {policy}"]
    assert got["layers"] == layers
    assert got["tokens"] == one["tokens"]
    assert got["tokens"] == runs[f"{family} {policy} modules"]["tokens"]
    assert got["read"] == one["read"]  # per-step bytes, summed over ranks


def test_fused_layers_on_shards_say_so_and_refuse_other_plans(sharded):
    _, runs = sharded
    assert "decode layers: fused (asked for)" in runs["describe"]
    # an MLP left whole on every rank is not the column/row plan the fused layers run
    assert "mlp.gate_proj.weight is whole on every rank" in runs["whole_mlp"]


def test_heads_must_split_evenly():
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_attention_heads=9, num_key_value_heads=3, hidden_size=576, intermediate_size=1536)
    with pytest.raises(tp.TensorParallelError, match="num_key_value_heads=3 not divisible by 2"):
        tp._check_divisible(cfg, 2)
    tp._check_divisible(cfg, 3)


def test_without_torchrun_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(tp.TensorParallelError, match="torchrun --nproc-per-node"):
        tp.init_distributed()


def test_unsharded_model_keeps_its_shape(setup):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(setup[0] / "model")
    shape = hf.ModelShape.of(model)
    assert tp.rank_local_shape(model, shape) == shape
    assert (shape.num_q_heads, shape.num_kv_heads) == (8, 4)
