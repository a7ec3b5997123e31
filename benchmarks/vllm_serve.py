#!/usr/bin/env python3
"""composable-kv served through vLLM 0.26.0 (the CUSTOM backend) on the GPU machine: gpu/vllm.sh runs it.

  smoke        a tiny random Llama (4 layers, token-id prompts of 600 and 1500 tokens, 512-token chunked
               prefill, so steps mix one request's decode with the other's prefill): greedy tokens of
               CUSTOM with the dense policy equal TRITON_ATTN's, eager and with CUDA graphs (a flip at a
               near-tie, as the shared vllm_smoke.py defines it, is reported and passes); quest and
               quest+art (256-token budget, so they select) run eager and with graphs, and their graph
               tokens must equal their eager ones. vLLM 0.26 runs these models on its V2 model runner;
               the dense and quest+art graph runs are repeated on the V1 runner (VLLM_USE_V2_MODEL_RUNNER=0),
               which orders and pads batches its own way. Prints PASS or exits non-zero.
  bench        end-to-end decode tokens/s of one backend (and policy) at contexts x batches, on a random
               model with Qwen2.5-Coder-0.5B's shape (24 layers, 14 q / 2 KV heads of 64), bf16, CUDA graphs.
               Each shape: prefill the prompts (max_tokens=1; prefix caching keeps their blocks), then the
               same prompts with max_tokens=1+N: the cached prefix is not recomputed, so that run is N decode
               steps. Writes $OUT/vllm-bench-<name>.json and prints a markdown row per shape next to the
               floor (weights + dense KV bytes per step / the copy bandwidth measured in the same run).

  needle       accuracy through vLLM on the real 32k model (Qwen2.5-Coder-0.5B-Instruct, `--model`, fetched and
               de-quantized by composable_kv.assets into a plain HF folder): the evaluation at scale's prompts
               (composable_kv.eval.tasks, chat template, the same seeds, depths and n = 50 per task), greedy,
               token ids in and out (our tokenizer decodes and scores, as `ckv eval` does). One backend or
               CUSTOM policy per call; writes $OUT/vllm-needle-<name>.json and markdown rows with Wilson 95%
               intervals, comparable cell by cell with EVALUATION.md's rows of our own runtime.

Every engine runs in its own subprocess (a clean start per backend and mode).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import harness  # benchmarks/harness.py (this folder is on sys.path when run as a script)

os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_USE_FLASHINFER_SAMPLER="0", HF_HUB_OFFLINE="1",
                  TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
TINY, QWEN = "/tmp/ckv-tiny-llama", "/tmp/ckv-qwen-shape"
SMOKE_PROMPTS = [[(7 * i + 3) % 1000 + 3 for i in range(600)], [(11 * i + 5) % 1000 + 3 for i in range(1500)]]
SMALL = {"quest": "stages:\n  - {stage: quest, budget_tokens: 256}\n  - {stage: attend}\n",
         "quest_art": "stages:\n  - {stage: quest, budget_tokens: 256}\n"
                      "  - {stage: art, stop: certified, delta: 0.01, chunk_pages: 4}\n"}


def save_tiny():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(TINY)


def save_qwen_shape():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768 + 1024,
                      rope_theta=1e6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(QWEN)


def engine(backend, *, model, eager, max_model_len, max_num_seqs, **kw):
    from vllm import LLM
    return LLM(model=model, skip_tokenizer_init=True, enforce_eager=eager, dtype="bfloat16",
               attention_backend=backend, max_model_len=max_model_len, max_num_seqs=max_num_seqs, seed=0, **kw)


def run_smoke_one(backend, eager):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    llm = engine(backend, model=TINY, eager=eager, max_model_len=2048, max_num_seqs=8, gpu_memory_utilization=0.3,
                 max_num_batched_tokens=512)
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, detokenize=False, logprobs=2)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in SMOKE_PROMPTS], sp, use_tqdm=False)
    res = []
    for o in outs:
        c = o.outputs[0]
        steps = [{"lp": float(pos[t].logprob),
                  "top": sorted(((float(x.logprob), int(i)) for i, x in pos.items()))[::-1][:2]}
                 for t, pos in zip(c.token_ids, c.logprobs)]
        res.append({"tokens": [int(t) for t in c.token_ids], "steps": steps})
    print("RESULT " + json.dumps(res), flush=True)


def child(args, env=None):
    r = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True,
                       env={**os.environ, **(env or {})})
    sys.stdout.writelines(ln for ln in r.stdout.splitlines(True) if not ln.startswith("RESULT "))
    if r.returncode:
        sys.exit(f"FAIL: {' '.join(args)} {env or ''} exited with {r.returncode}")
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


def smoke():
    sys.path.insert(0, "/tmp/vsite")
    from vllm_smoke import compare  # the shared smoke test's near-tie rule (travels in the vLLM bundle)
    save_tiny()
    for name, text in SMALL.items():
        with open(f"/tmp/ckv-small-{name}.yaml", "w") as f:
            f.write(text)
    runs = {}
    for mode in ("eager", "graph"):
        runs["TRITON_ATTN", mode] = child(["--smoke-one", "TRITON_ATTN", mode])
        runs["dense", mode] = child(["--smoke-one", "CUSTOM", mode], {"CKV_POLICY": "dense"})
        for name in SMALL:
            runs[name, mode] = child(["--smoke-one", "CUSTOM", mode], {"CKV_POLICY": f"/tmp/ckv-small-{name}.yaml"})
    v1 = {"VLLM_USE_V2_MODEL_RUNNER": "0"}
    runs["TRITON_ATTN-v1", "graph"] = child(["--smoke-one", "TRITON_ATTN", "graph"], v1)
    runs["dense-v1", "graph"] = child(["--smoke-one", "CUSTOM", "graph"], {**v1, "CKV_POLICY": "dense"})
    runs["quest_art-v1", "graph"] = child(["--smoke-one", "CUSTOM", "graph"],
                                          {**v1, "CKV_POLICY": "/tmp/ckv-small-quest_art.yaml"})
    checks = [(("TRITON_ATTN", "eager"), ("TRITON_ATTN", "graph")), (("TRITON_ATTN", "eager"), ("dense", "eager")),
              (("TRITON_ATTN", "graph"), ("dense", "graph"))] + [((n, "eager"), (n, "graph")) for n in SMALL] + [
              (("TRITON_ATTN-v1", "graph"), ("dense-v1", "graph")), (("quest_art", "eager"), ("quest_art-v1", "graph"))]
    ok = True
    for a, b in checks:
        for k, (x, y) in enumerate(zip(runs[a], runs[b])):
            why = compare(x, y)
            verdict = "same" if why is None else ("NOTE " if why.startswith("near-tie") else "MISMATCH ") + why
            ok = ok and (why is None or why.startswith("near-tie"))
            print(f"{'/'.join(a)} vs {'/'.join(b)} prompt {k}: {verdict}")
    for n in SMALL:  # how far a 256-token budget moves the tiny model's greedy tokens (reported, not asserted)
        same = [sum(p == q for p, q in zip(x["tokens"], y["tokens"])) for x, y in zip(runs[n, "eager"], runs["dense", "eager"])]
        print(f"{n} (budget 256) vs dense, eager: {same} of 16 tokens equal")
    assert ok, "greedy tokens differ beyond near-ties"
    print("PASS: CUSTOM(dense) == TRITON_ATTN, eager and CUDA graphs, V2 and V1 runners; quest / quest_art "
          "graph == eager (quest_art on both runners)")


SHORT = 32  # decode steps of the shorter timed generate


def bench_one(backend, name, contexts, batches, new_tokens, tp=1):
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    llm = engine(backend, model=QWEN, eager=False, max_model_len=max(contexts) + new_tokens + 64,
                 max_num_seqs=max(batches), gpu_memory_utilization=0.6, enable_prefix_caching=True,
                 tensor_parallel_size=tp)
    bw = harness.copy_bandwidth("cuda", 2 << 30)
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(QWEN)
    params = (cfg.vocab_size * cfg.hidden_size + cfg.num_hidden_layers * (
        cfg.hidden_size * (cfg.hidden_size + 2 * cfg.num_key_value_heads * 64) + cfg.hidden_size * cfg.hidden_size
        + 3 * cfg.hidden_size * cfg.intermediate_size))
    weight_bytes = 2 * params
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * 64 * 2
    rows = []
    g = torch.Generator().manual_seed(1)
    for ctx in contexts:
        for B in batches:
            prompts = [TokensPrompt(prompt_token_ids=torch.randint(3, cfg.vocab_size, (ctx,), generator=g).tolist())
                       for _ in range(B)]
            greedy = dict(temperature=0.0, ignore_eos=True, detokenize=False)
            t0 = time.perf_counter()
            llm.generate(prompts, SamplingParams(max_tokens=1, **greedy), use_tqdm=False)
            t_prefill = time.perf_counter() - t0
            # two decode lengths, timed the same way: their difference is new_tokens steps, free of what one
            # generate also pays (the prefix-cache lookup of each prompt, its recomputed tail, the first step)
            spans = []
            for n in (1 + SHORT, 1 + SHORT + new_tokens):
                t0 = time.perf_counter()
                llm.generate(prompts, SamplingParams(max_tokens=n, **greedy), use_tqdm=False)
                spans.append(time.perf_counter() - t0)
            t_decode = spans[1] - spans[0]
            floor = bw / (weight_bytes + B * (ctx + SHORT + new_tokens // 2) * kv_per_token) * B
            rows.append(dict(backend=backend, policy=name, tp=tp, context=ctx, batch=B, new_tokens=new_tokens,
                             prefill_s=t_prefill, decode_s=t_decode, short_s=spans[0],
                             tokens_per_s=B * new_tokens / t_decode,
                             floor_tokens_per_s=floor, copy_GBps=bw / 1e9))
            print(f"| {name} | {ctx} | {B} | {rows[-1]['tokens_per_s']:.0f} | {floor:.0f} | "
                  f"{t_decode:.2f} s for {new_tokens} steps ({1 + SHORT + new_tokens} new tokens less "
                  f"{1 + SHORT}) |", flush=True)
    print("RESULT " + json.dumps(rows), flush=True)


def bench(backend, policy, contexts, batches, new_tokens, tp=1):
    import torch
    if tp > torch.cuda.device_count():
        sys.exit(f"bench --tp {tp}: this machine has {torch.cuda.device_count()} GPU(s); use --tp <= that "
                 "(two GPUs: the nvidia-h200-x2 machine)")
    if not os.path.isdir(QWEN):
        save_qwen_shape()
    name = (backend if backend != "CUSTOM" else f"CUSTOM:{policy}") + (f":tp{tp}" if tp > 1 else "")
    env = {"CKV_POLICY": policy} if backend == "CUSTOM" else {}
    print("| backend:policy | context | batch | decode tokens/s | floor tokens/s (dense bytes) | note |\n|---|---|---|---|---|---|")
    rows = child(["--bench-one", backend, name, ",".join(map(str, contexts)), ",".join(map(str, batches)),
                  str(new_tokens), str(tp)], env)
    table = "\n".join(f"| {r['backend']}:{r['policy']} | {r['context']} | {r['batch']} | {r['tokens_per_s']:,.0f} "
                      f"| {r['floor_tokens_per_s']:,.0f} |" for r in rows)
    harness.write_report(os.environ.get("OUT", "."), f"vllm-bench-{name.replace(':', '-')}", harness.run_meta(),
                         rows, "| backend:policy | context | batch | decode tokens/s | floor tokens/s |\n|---|---|---|---|---|\n"
                         + table,
                         title=f"vLLM {name}")


def needle_prompts(model_name, tasks, ctx, samples_per_depth, path):
    """Convert the model (cached), build the prompts, write them to `path`: -> (model folder, tokenizer, samples,
    stop token ids)."""
    import torch
    from composable_kv import assets, hf
    from composable_kv.eval import scale, tasks as T
    model = assets.load_model(model_name, dtype=torch.bfloat16, device="cpu")  # writes the converted folder
    tok = assets.load_tokenizer(model_name)
    folder = str(assets.converted_model_dir(model_name, torch.bfloat16))
    eos = sorted(hf._eos_ids(model, tok))
    if not (Path(folder) / "config.json").is_file():
        sys.exit(f"needle: no converted model at {folder} (composable_kv.assets could not write it; see above)")
    del model
    essays = assets.load_essays() if any(T.needs_essays(t) for t in tasks) else None
    samples = [s for t in tasks for s in T.build_samples(t, tok, ctx, depths=scale.SCALE_DEPTHS,
                                                         samples_per_depth=samples_per_depth, essays=essays,
                                                         prompt_format="chat")]
    with open(path, "w") as f:
        json.dump({"model": folder, "stop": eos, "prompts": [s.prompt_ids for s in samples],
                   "max_new": [s.max_new_tokens for s in samples]}, f)
    return folder, tok, samples


def needle_one(backend, path, ctx):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    doc = json.load(open(path))
    llm = engine(backend, model=doc["model"], eager=False, max_model_len=ctx,  # prompt + answer <= ctx
                 max_num_seqs=16, gpu_memory_utilization=0.6, enable_prefix_caching=False)
    params = [SamplingParams(temperature=0.0, max_tokens=n, stop_token_ids=doc["stop"], detokenize=False)
              for n in doc["max_new"]]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in doc["prompts"]], params, use_tqdm=False)
    print("RESULT " + json.dumps([[int(t) for t in o.outputs[0].token_ids] for o in outs]), flush=True)


def needle(backend, policy, model_name, tasks, ctx, samples_per_depth):
    from composable_kv.eval import evaluate, tasks as T
    path = f"/tmp/ckv-needle-{ctx}.json"
    folder, tok, samples = needle_prompts(model_name, tasks, ctx, samples_per_depth, path)
    name = backend if backend != "CUSTOM" else f"CUSTOM:{policy}"
    env = {"CKV_POLICY": policy} if backend == "CUSTOM" else {}
    generated = child(["--needle-one", backend, path, str(ctx)], env)
    rows = []
    for task in tasks:
        mine = [(s, g) for s, g in zip(samples, generated) if s.task == task]
        scores = [T.score_sample(s, tok.decode(g, skip_special_tokens=True)) for s, g in mine]
        acc = sum(scores) / len(scores)
        lo, hi = evaluate.wilson_interval(acc, len(scores))
        rows.append(dict(backend=backend, policy=name, model=model_name, task=task, ctx=ctx, samples=len(scores),
                         accuracy=acc, ci_low=lo, ci_high=hi,
                         outputs=[tok.decode(g, skip_special_tokens=True) for _, g in mine]))
        print(f"| {name} | {task} | {ctx} | {len(scores)} | {acc:.2f} [{lo:.2f}, {hi:.2f}] |", flush=True)
    mean = sum(r["accuracy"] for r in rows) / len(rows)
    table = "| backend:policy | task | context | n | accuracy [95% CI] |\n|---|---|---|---|---|\n" + "\n".join(
        f"| {r['policy']} | {r['task']} | {r['ctx']} | {r['samples']} | {r['accuracy']:.2f} "
        f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}] |" for r in rows) + f"\n\nmean accuracy over the tasks: {mean:.3f}"
    harness.write_report(os.environ.get("OUT", "."), f"vllm-needle-{ctx}-{name.replace(':', '-')}",
                         harness.run_meta(), rows, table, title=f"vLLM needle accuracy, {name}, {model_name}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--smoke-one"]:
        run_smoke_one(sys.argv[2], sys.argv[3] == "eager")
    elif sys.argv[1:2] == ["--needle-one"]:
        needle_one(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1:2] == ["--bench-one"]:
        b, n, c, bs, nt, tp = sys.argv[2:8]
        bench_one(b, n, [int(x) for x in c.split(",")], [int(x) for x in bs.split(",")], int(nt), int(tp))
    else:
        ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        sub = ap.add_subparsers(dest="cmd", required=True)
        sub.add_parser("smoke")
        b = sub.add_parser("bench")
        b.add_argument("backend", choices=["CUSTOM", "TRITON_ATTN", "FLASH_ATTN", "FLASHINFER"])
        b.add_argument("--policy", default="dense", help="CKV_POLICY for CUSTOM (path or shipped name)")
        b.add_argument("--contexts", default="16384,32768")
        b.add_argument("--batches", default="16,64")
        b.add_argument("--new-tokens", type=int, default=128)
        b.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (the two-GPU machine: 2)")
        n = sub.add_parser("needle")
        n.add_argument("backend", choices=["CUSTOM", "TRITON_ATTN", "FLASH_ATTN", "FLASHINFER"])
        n.add_argument("--policy", default="dense", help="CKV_POLICY for CUSTOM (path or shipped name)")
        n.add_argument("--model", default="qwen2.5-coder-0.5b")
        n.add_argument("--ctx", type=int, default=32768)
        n.add_argument("--task", action="append", help="repeatable (default: niah_single niah_multikey "
                                                       "niah_multivalue niah_multiquery)")
        n.add_argument("--samples-per-depth", type=int, default=10, help="x 5 depths (10: n = 50 per task)")
        a = ap.parse_args()
        if a.cmd == "needle":
            from composable_kv.eval.tasks import RETRIEVAL_TASKS
            bad = [t for t in a.task or [] if t not in RETRIEVAL_TASKS]
            if bad or a.ctx < 1024 or a.samples_per_depth < 1:
                ap.error(f"needle: tasks from {', '.join(RETRIEVAL_TASKS)} (got {bad}), --ctx >= 1024, "
                         "--samples-per-depth >= 1")
            needle(a.backend, a.policy, a.model, a.task or ["niah_single", "niah_multikey", "niah_multivalue",
                                                            "niah_multiquery"], a.ctx, a.samples_per_depth)
        elif a.cmd == "smoke":
            smoke()
        else:
            if a.tp < 1:
                ap.error(f"bench: --tp must be >= 1, got {a.tp}")
            bench(a.backend, a.policy, [int(x) for x in a.contexts.split(",")],
                  [int(x) for x in a.batches.split(",")], a.new_tokens, a.tp)
