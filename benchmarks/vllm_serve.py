#!/usr/bin/env python3
"""composable-kv served through vLLM 0.26.0 (the CUSTOM backend) on the GPU machine: gpu/vllm.sh runs it.

  smoke        (--quick: only CUSTOM(dense) against TRITON_ATTN with CUDA graphs, two engines)
               a tiny random Llama (4 layers, token-id prompts of 600 and 1500 tokens, 512-token chunked
               prefill, so steps mix one request's decode with the other's prefill): greedy tokens of
               CUSTOM with the dense policy equal TRITON_ATTN's, eager and with CUDA graphs (a flip at a
               near-tie, as the shared vllm_smoke.py defines it, is reported and passes); quest and
               quest+art (256-token budget, so they select) run eager and with graphs, and their graph
               tokens must equal their eager ones. vLLM 0.26 runs these models on its V2 model runner;
               the dense and quest+art graph runs are repeated on the V1 runner (VLLM_USE_V2_MODEL_RUNNER=0),
               which orders and pads batches its own way. Prints PASS or exits non-zero.
  bench        end-to-end decode tokens/s of backends (SPEC: FLASH_ATTN, TRITON_ATTN, CUSTOM:<policy>, ...), one
               engine each, at contexts x batches, bf16, CUDA graphs. --weights random: a random model with
               Qwen2.5-Coder-0.5B's shape (24 layers, 14 q / 2 KV heads of 64) and random token prompts;
               --weights real: the real model and windows of the essays (real attention: ART's stop and
               Quest's picks depend on it). Per shape: prefill the prompts (max_tokens=1; prefix caching
               keeps their blocks; a smaller batch is the larger one's first prompts), then two generates
               of 1+32 and 1+32+N tokens, timed alike: the difference is N decode steps (the median of
               --repeats such pairs). Writes
               $OUT/vllm-bench-<weights>-<contexts>.json/.md (rewritten after each spec) with each row next
               to the first spec's and the floor (weights + dense KV bytes per step / the copy bandwidth
               measured in the same run).

  needle       accuracy through vLLM on the real 32k model (Qwen2.5-Coder-0.5B-Instruct, `--model`, fetched and
               de-quantized by composable_kv.assets into a plain HF folder): the evaluation at scale's prompts
               (composable_kv.eval.tasks, chat template, the same seeds, depths and n = 50 per task), greedy,
               token ids in and out (our tokenizer decodes and scores, as `ckv eval` does). SPECs as for
               bench, one engine each over the same prompts; writes $OUT/vllm-needle-<ctx>.json/.md (a row per
               spec, Wilson 95% intervals), comparable cell by cell with EVALUATION.md's rows of our runtime.

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
BACKENDS = ("CUSTOM", "TRITON_ATTN", "FLASH_ATTN", "FLASHINFER")
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


def child(args, env=None, check=True):
    """Run this script with `args` in a new process; -> its RESULT line's JSON (None if it failed and not check)."""
    r = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True,
                       env={**os.environ, **(env or {})})
    sys.stdout.writelines(ln for ln in r.stdout.splitlines(True) if not ln.startswith("RESULT "))
    if r.returncode:
        if not check:
            print(f"FAIL: {' '.join(args)} {env or ''} exited with {r.returncode}", flush=True)
            return None
        sys.exit(f"FAIL: {' '.join(args)} {env or ''} exited with {r.returncode}")
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


def smoke(quick=False):
    sys.path.insert(0, "/tmp/vsite")
    from vllm_smoke import compare  # the shared smoke test's near-tie rule (travels in the vLLM bundle)
    save_tiny()
    if quick:  # the prefill kernel and the captured decode in two engines (~1 min)
        a = child(["--smoke-one", "TRITON_ATTN", "graph"])
        b = child(["--smoke-one", "CUSTOM", "graph"], {"CKV_POLICY": "dense"})
        whys = [compare(x, y) for x, y in zip(a, b)]
        for k, why in enumerate(whys):
            print(f"TRITON_ATTN/graph vs dense/graph prompt {k}: {why or 'same'}")
        assert all(w is None or w.startswith("near-tie") for w in whys), "greedy tokens differ beyond near-ties"
        print("PASS (quick): CUSTOM(dense) == TRITON_ATTN with CUDA graphs and chunked prefill")
        return
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


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'FLASH_ATTN' -> ('FLASH_ATTN', None); 'CUSTOM:configs/quest_art.yaml' -> ('CUSTOM', that policy)."""
    backend, _, policy = spec.partition(":")
    if backend not in BACKENDS or (backend == "CUSTOM") != bool(policy):
        sys.exit(f"backend spec {spec!r}: use one of {', '.join(b for b in BACKENDS if b != 'CUSTOM')} or "
                 "CUSTOM:<policy> (a YAML path or a shipped name, e.g. CUSTOM:quest_art)")
    if policy:
        from composable_kv.errors import CkvError
        from composable_kv.integrations.vllm.policy import load_serving_policy
        try:
            load_serving_policy(policy)  # the refusals the engine would print at start-up, before any engine
        except CkvError as e:
            sys.exit(f"backend spec {spec!r}: {e}")
    return backend, policy or None


def bench_model(weights: str, model_name: str) -> tuple[str, list[int] | None]:
    """-> (the HF folder vLLM loads, the prompts' text ids or None for random ids)."""
    if weights == "random":
        if not os.path.isdir(QWEN):
            save_qwen_shape()
        return QWEN, None
    import torch
    from composable_kv import assets
    from e2e import essay_ids
    folder = assets.converted_model_dir(model_name, torch.bfloat16)
    if not (folder / "config.json").is_file():
        assets.load_model(model_name, dtype=torch.bfloat16, device="cpu")  # writes the converted folder
    return str(folder), essay_ids(model_name)


def dense_floor_tokens_per_s(cfg, bw: float, batch: int, mean_len: int, tp: int = 1) -> float:
    """Tokens/s if each decode step read the bf16 weights and every request's dense K/V (mean_len tokens) once
    at bandwidth bw (bytes/s). Under tensor parallelism each of the tp GPUs reads its shard at the same time:
    1/tp of the weights and its share of the KV heads (at least one: fewer heads than GPUs are replicated)."""
    hd = cfg.hidden_size // cfg.num_attention_heads
    params = (cfg.vocab_size * cfg.hidden_size + cfg.num_hidden_layers * (
        cfg.hidden_size * (cfg.hidden_size + 2 * cfg.num_key_value_heads * hd) + cfg.hidden_size * cfg.hidden_size
        + 3 * cfg.hidden_size * cfg.intermediate_size))
    kv_heads_per_gpu = -(-cfg.num_key_value_heads // tp)
    kv_per_token = cfg.num_hidden_layers * 2 * kv_heads_per_gpu * hd * 2  # K and V, bf16, this GPU's heads
    return bw / (2 * params / tp + batch * mean_len * kv_per_token) * batch


def bench_one(backend, name, model, text_path, contexts, batches, new_tokens, tp=1, repeats=3):
    from e2e import make_prompts
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(model)
    # a prompt and its 1 + SHORT + new_tokens tokens fit the model's positions (the real model's 32768: its
    # 32k prompts are that less the decoded tokens)
    room = cfg.max_position_embeddings - (1 + SHORT + new_tokens)
    t0 = time.perf_counter()
    llm = engine(backend, model=model, eager=False, max_model_len=min(max(contexts), room) + 1 + SHORT + new_tokens,
                 max_num_seqs=max(batches), gpu_memory_utilization=0.6, enable_prefix_caching=True,
                 tensor_parallel_size=tp)
    engine_s = time.perf_counter() - t0
    bw = harness.copy_bandwidth("cuda", 2 << 30)
    text_ids = json.load(open(text_path)) if text_path else None
    rows = []
    for ctx in (min(c, room) for c in contexts):
        pool = make_prompts(max(batches), ctx, cfg.vocab_size, text_ids)  # a smaller batch: the first B (cached)
        for B in batches:
            prompts = [TokensPrompt(prompt_token_ids=p) for p in pool[:B]]
            greedy = dict(temperature=0.0, ignore_eos=True, detokenize=False)
            t0 = time.perf_counter()
            llm.generate(prompts, SamplingParams(max_tokens=1, **greedy), use_tqdm=False)
            t_prefill = time.perf_counter() - t0
            # two decode lengths, timed the same way: their difference is new_tokens steps, free of what one
            # generate also pays (the prefix-cache lookup of each prompt, its recomputed tail, the first step);
            # the median of `repeats` such pairs (at B = 16 one pair varied 2x between runs on the H200, 51dd5bc)
            pairs = []
            for _ in range(repeats):
                spans = []
                for n in (1 + SHORT, 1 + SHORT + new_tokens):
                    t0 = time.perf_counter()
                    llm.generate(prompts, SamplingParams(max_tokens=n, **greedy), use_tqdm=False)
                    spans.append(time.perf_counter() - t0)
                pairs.append(spans)
            diffs = sorted(b - a for a, b in pairs)
            t_decode = diffs[len(diffs) // 2]
            floor = dense_floor_tokens_per_s(cfg, bw, B, ctx + SHORT + new_tokens // 2, tp)
            rows.append(dict(backend=backend, policy=name, tp=tp, context=ctx, batch=B, new_tokens=new_tokens,
                             text="essays" if text_ids else "random", engine_s=engine_s, prefill_s=t_prefill,
                             decode_s=t_decode, decode_s_each=diffs, short_s=[a for a, _ in pairs],
                             tokens_per_s=B * new_tokens / t_decode,
                             floor_tokens_per_s=floor, copy_GBps=bw / 1e9))
            print(f"{name} ctx {ctx} B {B}: {rows[-1]['tokens_per_s']:,.0f} tokens/s (floor {floor:,.0f}), "
                  f"{t_decode:.2f} s for {new_tokens} steps, prefill {t_prefill:.1f} s, engine {engine_s:.0f} s",
                  flush=True)
    print("RESULT " + json.dumps(rows), flush=True)


def bench_table(rows: list[dict]) -> str:
    """Markdown: one row per (spec, context, batch), with the ratio to the first spec's row of the same shape."""
    first = {(r["context"], r["batch"]): r["tokens_per_s"] for r in rows if r["name"] == rows[0]["name"]}
    lines = [f"| backend:policy | context | batch | decode tokens/s | x {rows[0]['name']} | floor tokens/s "
             "(dense bytes) | % of floor | prefill s | engine start s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = first.get((r["context"], r["batch"]))
        lines.append(f"| {r['name']} | {r['context']} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / base:.2f}x | {r['floor_tokens_per_s']:,.0f} | "
                     f"{100 * r['tokens_per_s'] / r['floor_tokens_per_s']:.0f}% | {r['prefill_s']:.1f} | "
                     f"{r['engine_s']:.0f} |" if base else "")
    return "\n".join(ln for ln in lines if ln)


def bench(specs, weights, model_name, contexts, batches, new_tokens, tp=1, repeats=3):
    """Each spec in its own engine (subprocess), one after another; the report is rewritten after each, so a
    call stopped by its time limit keeps the specs it finished."""
    import torch
    parsed = [parse_spec(s) for s in specs]  # every spec checked before the first engine starts
    if tp > torch.cuda.device_count():
        sys.exit(f"bench --tp {tp}: this machine has {torch.cuda.device_count()} GPU(s); use --tp <= that "
                 "(two GPUs: the nvidia-h200-x2 machine)")
    model, text_ids = bench_model(weights, model_name)
    text_path = None
    if text_ids is not None:
        text_path = "/tmp/ckv-bench-text.json"
        json.dump(text_ids, open(text_path, "w"))
    stem = f"vllm-bench-{weights}-{'-'.join(map(str, contexts))}" + (f"-tp{tp}" if tp > 1 else "")
    rows = []
    for spec, (backend, policy) in zip(specs, parsed):
        name = spec + (f":tp{tp}" if tp > 1 else "")
        env = {"CKV_POLICY": policy} if policy else {}
        got = child(["--bench-one", backend, name, model, text_path or "", ",".join(map(str, contexts)),
                     ",".join(map(str, batches)), str(new_tokens), str(tp), str(repeats)], env, check=False)
        if got is None:
            print(f"{spec}: its engine failed (above); the other specs go on", flush=True)
            continue
        rows += [dict(r, name=name, weights=weights, model=model_name if weights == "real" else "qwen2.5-0.5b-shape")
                 for r in got]
        harness.write_report(os.environ.get("OUT", "."), stem, harness.run_meta(), rows, bench_table(rows),
                             title=f"vLLM decode tokens/s, {weights} weights")
    print(bench_table(rows) if rows else "no spec finished")


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


def needle(specs, model_name, tasks, ctx, samples_per_depth):
    """Each spec's engine over the same prompts (one subprocess each); one report, rewritten after each spec."""
    from composable_kv.eval import evaluate, tasks as T
    parsed = [parse_spec(s) for s in specs]
    path = f"/tmp/ckv-needle-{ctx}.json"
    folder, tok, samples = needle_prompts(model_name, tasks, ctx, samples_per_depth, path)
    rows = []
    for name, (backend, policy) in zip(specs, parsed):
        env = {"CKV_POLICY": policy} if policy else {}
        generated = child(["--needle-one", backend, path, str(ctx)], env, check=False)
        if generated is None:
            print(f"{name}: its engine failed (above); the other specs go on", flush=True)
            continue
        for task in tasks:
            mine = [(s, g) for s, g in zip(samples, generated) if s.task == task]
            scores = [T.score_sample(s, tok.decode(g, skip_special_tokens=True)) for s, g in mine]
            acc = sum(scores) / len(scores)
            lo, hi = evaluate.wilson_interval(acc, len(scores))
            rows.append(dict(backend=backend, policy=name, model=model_name, task=task, ctx=ctx, samples=len(scores),
                             accuracy=acc, ci_low=lo, ci_high=hi,
                             outputs=[tok.decode(g, skip_special_tokens=True) for _, g in mine]))
            print(f"| {name} | {task} | {ctx} | {len(scores)} | {acc:.2f} [{lo:.2f}, {hi:.2f}] |", flush=True)
        harness.write_report(os.environ.get("OUT", "."), f"vllm-needle-{ctx}", harness.run_meta(), rows,
                             needle_table(rows), title=f"vLLM needle accuracy, {model_name}, {ctx} tokens")


def needle_table(rows: list[dict]) -> str:
    """Markdown: a row per spec, a column per task, and the mean over the tasks."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lines = ["| backend:policy | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
    for name in dict.fromkeys(r["policy"] for r in rows):
        mine = {r["task"]: r for r in rows if r["policy"] == name}
        cells = [f"{mine[t]['accuracy']:.2f} [{mine[t]['ci_low']:.2f}, {mine[t]['ci_high']:.2f}]" for t in tasks]
        mean = sum(mine[t]["accuracy"] for t in tasks) / len(tasks)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.3f} |")
    return "\n".join(lines) + f"\n\nn = {rows[0]['samples']} per cell, Wilson 95% intervals."


if __name__ == "__main__":
    if sys.argv[1:2] == ["--smoke-one"]:
        run_smoke_one(sys.argv[2], sys.argv[3] == "eager")
    elif sys.argv[1:2] == ["--needle-one"]:
        needle_one(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1:2] == ["--bench-one"]:
        b, n, model, text, c, bs, nt, tp, reps = sys.argv[2:11]
        bench_one(b, n, model, text or None, [int(x) for x in c.split(",")], [int(x) for x in bs.split(",")],
                  int(nt), int(tp), int(reps))
    else:
        ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        sub = ap.add_subparsers(dest="cmd", required=True)
        sm = sub.add_parser("smoke")
        sm.add_argument("--quick", action="store_true", help="only CUSTOM(dense) against TRITON_ATTN, CUDA graphs")
        spec_help = "FLASH_ATTN, TRITON_ATTN, FLASHINFER or CUSTOM:<policy> (a YAML path or a shipped name)"
        b = sub.add_parser("bench")
        b.add_argument("specs", nargs="+", metavar="SPEC", help=spec_help)
        b.add_argument("--weights", choices=("random", "real"), default="random",
                       help="random: Qwen2.5-Coder-0.5B's shape, random token prompts; real: the --model's weights "
                            "with the essays as prompts (real attention, which ART's stop depends on)")
        b.add_argument("--model", default="qwen2.5-coder-0.5b", help="for --weights real")
        b.add_argument("--contexts", default="16384,32768")
        b.add_argument("--batches", default="16,64")
        b.add_argument("--new-tokens", type=int, default=128)
        b.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (the two-GPU machine: 2)")
        b.add_argument("--repeats", type=int, default=3, help="timed pairs of generates per shape (the median)")
        n = sub.add_parser("needle")
        n.add_argument("specs", nargs="+", metavar="SPEC", help=spec_help)
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
            needle(a.specs, a.model, a.task or ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"],
                   a.ctx, a.samples_per_depth)
        elif a.cmd == "smoke":
            smoke(a.quick)
        else:
            if a.tp < 1 or a.repeats < 1:
                ap.error(f"bench: --tp and --repeats must be >= 1, got {a.tp} and {a.repeats}")
            bench(a.specs, a.weights, a.model, [int(x) for x in a.contexts.split(",")],
                  [int(x) for x in a.batches.split(",")], a.new_tokens, a.tp, a.repeats)
