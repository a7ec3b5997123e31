"""`ckv eval` and `ckv demo`. Each add_*_parser sets ``func(args) -> int`` (the exit code)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

DEMO_POLICIES = ("configs/dense.yaml", "configs/quest.yaml", "configs/quest_art.yaml")
DEMO_TASKS = ("passkey", "niah_single")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _add_model_args(p) -> None:
    p.add_argument("--model", metavar="PATH", default=None,
                   help="Hugging Face model folder or .gguf file (default: SmolLM2-135M-Instruct, fetched once)")
    p.add_argument("--essays", metavar="DIR", default=None,
                   help="folder of .txt essays used as haystack (default: Paul Graham essays, fetched once)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model and KV dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--out", metavar="DIR", default=None, help="where to write results (.md, .json, .png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_eval_parser(subparsers):
    p = subparsers.add_parser(
        "eval", help="run tasks x policies, report accuracy / fidelity and KV bytes read",
        description="Evaluate policies on long-context tasks. Writes a markdown table (also printed), "
                    "a JSON file and a PNG plot of accuracy against KV bytes read.")
    p.add_argument("--policy", action="append", required=True, metavar="YAML",
                   help="policy file (repeat for several)")
    p.add_argument("--task", action="append", default=None,
                   help="passkey, niah_single, niah_multikey, niah_multivalue, niah_multiquery or "
                        "fidelity (repeat for several; default passkey)")
    p.add_argument("--ctx", action="append", type=int, default=None,
                   help="context length in tokens, prompt plus answer (repeat; default 4096)")
    p.add_argument("--depths", type=_floats, default=[0.1, 0.5, 0.9],
                   help="needle depths in [0,1], comma separated (default 0.1,0.5,0.9)")
    p.add_argument("--samples-per-depth", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4, help="prompts decoded together")
    p.add_argument("--continuation", type=int, default=32, help="fidelity: teacher-forced tokens per window")
    p.add_argument("--windows", type=int, default=1, help="fidelity: essay windows per context length")
    p.add_argument("--seed", type=int, default=0)
    _add_model_args(p)
    p.set_defaults(func=run_eval_command)
    return p


def add_demo_parser(subparsers):
    p = subparsers.add_parser(
        "demo", help="the default model on passkey and needle prompts and fidelity vs dense: dense, quest, quest+art",
        description="Runs the default model (fetched once) through passkey and needle-retrieval prompts at "
                    "three depths and a teacher-forced fidelity check, with dense, quest and quest+art, and "
                    "prints accuracy, KL vs dense and the share of the KV cache read.")
    p.add_argument("--ctx", type=int, default=2048, help="context length (default 2048)")
    p.add_argument("--task", action="append", default=None, metavar="TASK",
                   help="retrieval task, repeatable (default: passkey and niah_single, a 7-digit magic "
                        "number in the essays)")
    p.add_argument("--continuation", type=int, default=16, help="fidelity: teacher-forced tokens")
    p.add_argument("--policy", action="append", default=None, metavar="YAML",
                   help="replace the demo's policies (repeatable)")
    _add_model_args(p)
    p.set_defaults(func=run_demo_command)
    return p


def _setup(args):
    """Load model + tokenizer per args; return (model, tokenizer, device, model_name)."""
    import torch

    from . import assets

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise assets.AssetError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu.")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if not args.quiet:
        print(f"composable-kv: loading {args.model or 'the default model (SmolLM2-135M-Instruct)'} on {device}",
              file=sys.stderr)
    model, tok = assets.load_model_and_tokenizer(args.model, dtype=dtype, device=device)
    name = str(args.model) if args.model else assets.DEFAULT_MODEL.target
    return model, tok, device, name


def _essays_text(args, need: bool):
    if not need:
        return None
    from .assets import load_essays
    return load_essays(args.essays)


def _check_policies(policies) -> None:
    from . import hf
    for p in policies:
        hf.compile_policy(p)


def _report(rows, args, device, model_name, stem: str) -> None:
    from . import evaluate
    meta = evaluate.run_metadata("ckv " + " ".join(shlex.quote(a) for a in sys.argv[1:]), device, model_name)
    out_dir = Path(args.out or f"ckv-results")
    res = evaluate.write_results(rows, out_dir, meta, stem=stem)
    print(res["table"])
    print(f"\nwrote {res['markdown']}, {res['json']}" + (f", {res['png']}" if res["png"] else ""))
    if res["note"]:
        print(res["note"], file=sys.stderr)


def _fail(exc: Exception) -> int:
    print(f"ckv: error: {exc}", file=sys.stderr)
    return 2


def run_eval_command(args) -> int:
    from . import evaluate
    from .errors import CkvError

    tasks_ = args.task or ["passkey"]
    ctxs = args.ctx or [4096]
    try:
        _check_policies(args.policy)  # before the slow model load
        model, tok, device, name = _setup(args)
        essays = _essays_text(args, any(t != "passkey" for t in tasks_))
        rows = evaluate.run_eval(model, tok, args.policy, tasks_, ctxs, depths=args.depths,
                                 samples_per_depth=args.samples_per_depth, batch_size=args.batch_size,
                                 continuation=args.continuation, windows=args.windows, essays=essays,
                                 seed=args.seed, progress=not args.quiet)
    except (CkvError, FileNotFoundError, ValueError) as exc:
        return _fail(exc)
    _report(rows, args, device, name, stem="eval")
    return 0


def run_demo_command(args) -> int:
    from . import evaluate
    from .errors import CkvError

    policies = args.policy or list(DEMO_POLICIES)
    tasks = args.task or list(DEMO_TASKS)
    root = Path(__file__).resolve().parent.parent
    policies = [p if Path(p).is_file() or not (root / p).is_file() else str(root / p) for p in policies]
    try:
        _check_policies(policies)
        model, tok, device, name = _setup(args)
        essays = _essays_text(args, True)
        rows = evaluate.run_eval(model, tok, policies, [*tasks, "fidelity"], [args.ctx],
                                 depths=(0.1, 0.5, 0.9), batch_size=3, continuation=args.continuation,
                                 windows=1, essays=essays, progress=not args.quiet)
    except (CkvError, FileNotFoundError, ValueError) as exc:
        return _fail(exc)
    print(demo_table(rows, tasks, args.ctx))
    print()
    _report(rows, args, device, name, stem="demo")
    return 0


def demo_table(rows, tasks: list[str], ctx: int) -> str:
    """One line per policy: retrieval accuracy per task, KL vs dense, top-1 agreement, % of KV read."""
    by_policy: dict[str, dict] = {}
    for r in rows:
        by_policy.setdefault(r.policy, {})[r.task] = r
    lines = [f"composable-kv demo: {', '.join(tasks)} (3 depths each) and fidelity vs dense, ctx={ctx}",
             "| policy | " + " | ".join(f"{t} acc" for t in tasks)
             + " | KL vs dense (nats) | top-1 agree | % KV read | KV MB/token |",
             "|---|" + "---:|" * (len(tasks) + 4)]
    for policy, d in by_policy.items():
        fid = d.get("fidelity")
        src = fid or d[tasks[0]]
        accs = " | ".join(f"{d[t].accuracy:.2f}" for t in tasks)
        lines.append(
            f"| {policy} | {accs} | {fid.kl_vs_dense:.4f} | {fid.top1_agreement:.3f} "
            f"| {100 * src.kv_read_fraction:.1f} | {src.kv_bytes_per_token / 1e6:.2f} |")
    lines.append("% KV read and MB/token: teacher-forced decode over the essays (pages + summaries, all layers).")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Stand-alone entry (`python -m composable_kv.eval_cli demo`) until `ckv` wires these in."""
    import argparse
    parser = argparse.ArgumentParser(prog="ckv")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    add_demo_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
