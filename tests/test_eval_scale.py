"""The scale evaluation, CPU-sized: a tiny random model, a character tokenizer, short contexts; the same
code path as the GPU run (batched chat prompts, one replayed prefill, rows saved as they finish), then
the report (EVALUATION.md section with Wilson intervals, one Pareto plot per context)."""

import json

import pytest
import torch

import composable_kv as ckv
from composable_kv.eval import scale as eval_scale

pytestmark = pytest.mark.cpu

ESSAYS = " ".join(f"Essay sentence {i} talks about startups, painters and hackers." for i in range(400))
ESSAYS += " " + " ".join("".join(chr(97 + (i // 26 ** k) % 26) for k in range(4)) for i in range(400))


class CharTokenizer:
    """One token per character (printable ASCII and newline), with a chat template; id 0 pads."""

    chat_template = "<u>...</u><a>"
    pad_token_id, eos_token_id, eos_token = 0, None, None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1 if c == "\n" else 2 + min(max(ord(c) - 32, 0), 94) for c in text]}

    def decode(self, ids, **_):
        return "".join("\n" if i == 1 else chr(i - 2 + 32) if i >= 2 else "" for i in ids)

    def batch_decode(self, seqs, **_):
        return [self.decode(s) for s in seqs]

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return f"<u>{messages[0]['content']}</u><a>"


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      initializer_range=0.2, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _policies():
    quest = {"name": "quest-art", "page_size": 16, "dense_layers": [0],
             "stages": [{"stage": "quest", "budget_tokens": 64}, {"stage": "art", "stop": "certified"}]}
    return [ckv.compile("configs/dense.yaml", backend="reference"), ckv.compile(quest, backend="reference")]


def test_tiny_scale_run_and_report(model, tmp_path):
    tasks = ("niah_single",)  # one task keeps the test short; the tasks have their own tests
    meta = {"command": "python -m composable_kv.eval.scale run (test)", "device": "cpu", "device_name": "cpu",
            "model": "tiny", "commit": "test", "torch": torch.__version__, "transformers": "x",
            "depths": [0.2, 0.8], "samples_per_depth": 1}
    for ctx in (768, 1024):
        rows = eval_scale.run_scale(model, CharTokenizer(), _policies(), ctx, tmp_path / f"scale-{ctx}-x.json",
                                    tasks=tasks, depths=(0.2, 0.8), samples_per_depth=1, batch_size=2,
                                    essays=ESSAYS, meta=meta, progress=False)
        assert [(r.policy, r.task) for r in rows] == [(p, t) for t in tasks for p in ("dense", "quest-art")]
        saved = json.loads((tmp_path / f"scale-{ctx}-x.json").read_text())
        assert len(saved["rows"]) == 2 and saved["meta"]["ctx"] == ctx
        for r in saved["rows"]:
            assert r["samples"] == 2 and len(r["outputs"]) == 2 and 0.0 <= r["accuracy"] <= 1.0
        dense, quest = saved["rows"][0], saved["rows"][1]
        assert dense["kv_read_fraction"] == pytest.approx(1.0) and quest["kv_read_fraction"] < 0.8

    evaluation = tmp_path / "EVALUATION.md"
    evaluation.write_text("# Evaluation\n\nHand-written CPU tables stay below.\n")
    files = [str(tmp_path / "scale-768-x.json"), str(tmp_path / "scale-1024-x.json")]
    for _ in range(2):  # a second report replaces the generated section instead of adding one
        assert eval_scale.main(["report", *files, "--evaluation", str(evaluation),
                                "--plots", str(tmp_path / "plots")]) == 0
    text = evaluation.read_text()
    assert text.startswith("# Evaluation\n\n" + eval_scale.BEGIN) and text.count(eval_scale.BEGIN) == 1
    assert text.rstrip().endswith("Hand-written CPU tables stay below.")
    assert "### 768 tokens" in text and "### 1024 tokens" in text and "| quest-art |" in text
    assert "![accuracy against KV bytes at 1024 tokens](plots/pareto-1024.png)" in text
    assert (tmp_path / "plots" / "pareto-768.png").stat().st_size > 0
    row = next(line for line in text.splitlines() if line.startswith("| dense |"))
    assert row.count("[") == len(tasks)  # an interval per task


def _row(policy, task, acc, mb=10.0):
    """One result row: accuracy over 50 prompts, mb KV MB read per token."""
    return {"policy": policy, "task": task, "accuracy": acc, "samples": 50, "kv_bytes_per_token": mb * 1e6,
            "kv_read_fraction": mb / 100}


def test_context_table_intervals_and_target():
    rows = [_row("dense", "passkey", 1.0, 100), _row("dense", "niah_single", 0.5, 100),
            _row("quest-art", "passkey", 1.0, 10), _row("quest-art", "niah_single", 0.46, 10)]
    table = eval_scale.context_table(rows, ["passkey", "niah_single"])
    assert "| dense | 1.00 [0.93, 1.00] | 0.50 [0.37, 0.63] | 0.750 | 100.00 | 100.0 |" in table
    line = eval_scale.target_lines(rows, 32768, ["passkey", "niah_single"])[0]
    assert "0.100x dense's bytes, +2.0 points below" in line and "(met)" in line and "niah_single +4" in line


def test_a_policy_missing_tasks_has_no_mean_no_point_and_no_target(tmp_path):
    tasks = ["passkey", "niah_single"]
    rows = [_row("dense", "passkey", 1.0), _row("quest-art", "passkey", 1.0)]  # a run stopped after one task
    table = eval_scale.context_table(rows, tasks)
    assert "| dense | 1.00 [0.93, 1.00] | not run | (1 of 2 tasks) |" in table
    assert "target not checked" in eval_scale.target_lines(rows, 32768, tasks)[0]
    note = eval_scale.pareto_plot(rows, 32768, tmp_path / "p.png", "m", tasks)
    assert not (tmp_path / "p.png").exists() and ("not drawn" in note or "matplotlib" in note)


def test_art_pairs_bytes_saved_and_the_interval():
    tasks = ["passkey", "niah_single"]
    rows = [_row("quest", "passkey", 1.0, 40), _row("quest", "niah_single", 0.6, 40),
            _row("quest-art", "passkey", 1.0, 28), _row("quest-art", "niah_single", 0.56, 28),
            _row("dense", "passkey", 1.0, 100), _row("dense", "niah_single", 0.8, 100),
            _row("dense-art", "passkey", 0.5, 60), _row("dense-art", "niah_single", 0.5, 60)]
    quest, dense, missing = eval_scale.pair_lines(rows, 8192, tasks, [("quest", "quest-art"), ("dense", "dense-art"),
                                                                       ("quest", "nothing")])
    assert "30.0% fewer" in quest and "inside its interval): met" in quest
    assert "40.0% fewer" in dense and "outside its interval): not met" in dense
    assert "not compared" in missing and "nothing vs quest" in missing


def test_report_only_and_pairs(tmp_path):
    rows = [{**_row(p, "passkey", 1.0, mb), "ctx": 1024} for p, mb in (("quest", 40.0), ("quest-art", 20.0),
                                                                      ("ltri", 10.0))]
    meta = {"model": "m", "device_name": "cpu", "commit": "c", "torch": "t", "transformers": "x", "ctx": 1024,
            "depths": [0.5], "samples_per_depth": 50, "command": "cmd", "seconds": 1.0}
    f = tmp_path / "scale-1024-x.json"
    f.write_text(json.dumps({"meta": meta, "rows": rows}))
    ev = tmp_path / "PARETO.md"
    ev.write_text("# ART\n")
    assert eval_scale.main(["report", str(f), "--evaluation", str(ev), "--plots", str(tmp_path / "p"),
                            "--only", "quest", "--only", "quest-art", "--pair", "quest:quest-art"]) == 0
    text = ev.read_text()
    assert "| quest-art |" in text and "| ltri |" not in text and "quest-art reads 50.0% fewer" in text
    assert eval_scale.main(["report", str(f), "--evaluation", str(ev), "--plots", str(tmp_path / "p"),
                            "--only", "nobody"]) == 2


def test_learned_stages_need_weights(model, tmp_path, monkeypatch):
    monkeypatch.setenv("CKV_CACHE_DIR", str(tmp_path))
    gate = ckv.compile("configs/write_gate_quest_art.yaml")
    with pytest.raises(ckv.errors.CkvError, match="no trained weights.*ckv train-gate"):
        eval_scale.check_learned_weights(model, [gate])
    predictor = ckv.compile({"name": "ap", "page_size": 16, "stages": [
        {"stage": "attention_predictor", "budget_tokens": 64, "weights": str(tmp_path / "none.pt")},
        {"stage": "attend"}]})
    with pytest.raises(ckv.errors.CkvError, match=f"stage attention_predictor has no trained weights at "
                                                  f"{tmp_path / 'none.pt'}; train them with `ckv train-predictor`"):
        eval_scale.check_learned_weights(model, [ckv.compile("configs/quest.yaml"), predictor])
    eval_scale.check_learned_weights(model, [ckv.compile("configs/quest.yaml")])  # nothing learned: no check


def test_bad_run_flags_exit_2(capsys):
    assert eval_scale.main.__module__ == "composable_kv.eval.scale"
    with pytest.raises(SystemExit) as exit_:
        eval_scale.main(["run", "--batch-size", "0"])
    assert exit_.value.code == 2 and "--batch-size" in capsys.readouterr().err


def test_shipped_configs_start_with_dense():
    configs = eval_scale.shipped_configs()
    assert configs[0] == "configs/dense.yaml" and "configs/quest_art.yaml" in configs
    assert not any("/eval/" in c for c in configs)


def _tiny_model_folder(folder):
    """A tiny random Llama and a character tokenizer with a chat template, saved as a Hugging Face folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = ["\n"] + [chr(i) for i in range(32, 127)]
    backend = Tokenizer(models.WordLevel({"<pad>": 0, **{c: i + 1 for i, c in enumerate(chars)}}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    template = ("{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}"
                "{% if add_generation_prompt %}<a>{% endif %}")
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", chat_template=template).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      eos_token_id=None, bos_token_id=None, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(folder)


def test_gpu_script_runs_cpu_sized(tmp_path):
    """gpu/eval_scale.sh run, then report, on a tiny local model on the CPU (the GPU run's plumbing)."""
    import os
    import subprocess

    _tiny_model_folder(tmp_path / "model")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the reference path: fast on CPU
    env.update(MODEL=str(tmp_path / "model"), OUT=str(tmp_path / "out"), CKV_CACHE_DIR=str(tmp_path / "cache"),
               EVAL_SCALE_ARGS="--policy configs/dense.yaml --policy configs/quest.yaml --task passkey "
                               "--depths 0.5 --samples-per-depth 2 --batch-size 2 --device cpu --quiet",
               RESULTS=str(tmp_path / "results"), EVALUATION=str(tmp_path / "EVALUATION.md"))
    (tmp_path / "EVALUATION.md").write_text("# Evaluation\n")
    run = subprocess.run(["bash", "gpu/eval_scale.sh", "run", "768"], env=env, capture_output=True, text=True,
                         cwd=eval_scale.REPO, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (result,) = (tmp_path / "out").glob("scale-768-*.json")
    saved = json.loads(result.read_text())
    assert [(r["policy"], r["task"], r["samples"]) for r in saved["rows"]] == [("dense", "passkey", 2),
                                                                              ("quest", "passkey", 2)]
    report = subprocess.run(["bash", "gpu/eval_scale.sh", "report", str(result)],
                            env=env, capture_output=True, text=True, cwd=eval_scale.REPO, timeout=600)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "### 768 tokens" in (tmp_path / "EVALUATION.md").read_text()
    assert (tmp_path / "results" / "pareto-768.png").is_file()
    bad = subprocess.run(["bash", "gpu/eval_scale.sh", "nonsense"], capture_output=True, text=True,
                         cwd=eval_scale.REPO)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_report_merges_the_files_of_one_context(tmp_path):
    def doc(rows, seconds):
        meta = {"command": f"run {seconds}", "ctx": 4096, "model": "m", "commit": "c", "seconds": seconds}
        return {"meta": meta, "rows": [{"policy": p, "task": t} for p, t in rows]}
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(doc([("dense", "passkey"), ("quest", "passkey")], 60)))
    b.write_text(json.dumps(doc([("ltri", "passkey")], 30)))
    c.write_text(json.dumps(doc([("quest", "passkey")], 10)))
    merged = eval_scale.load_results([a, b])[4096]
    assert [r["policy"] for r in merged["rows"]] == ["dense", "quest", "ltri"] and len(merged["metas"]) == 2
    with pytest.raises(ValueError, match="quest on passkey at 4096 is in both"):
        eval_scale.load_results([a, c])


def test_real_model_ready_names_the_missing_carry(tmp_path):
    """gpu/parts.sh's real_model_ready (the GPU calls' set-up of the 32k model) refuses, naming what to carry."""
    import subprocess

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "qwen2.5-coder-0.5b.gguf").write_bytes(b"joined")  # the parts were joined on an earlier call
    script = f". {eval_scale.REPO / 'gpu' / 'parts.sh'}; real_model_ready"
    got = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "CKV_CACHE_DIR": str(cache), "SITE": str(tmp_path / "site")})
    assert got.returncode == 2 and "no .devsite/eval-scale-cache.tgz: carry it with this call" in got.stderr
    (tmp_path / ".devsite").mkdir()
    subprocess.run(["tar", "czf", ".devsite/eval-scale-cache.tgz", "--files-from", "/dev/null"], cwd=tmp_path, check=True)
    got = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "CKV_CACHE_DIR": str(cache), "SITE": str(tmp_path / "site")})
    assert got.returncode == 2 and "no .devsite/wheels/*.whl: carry .devsite/wheels" in got.stderr
