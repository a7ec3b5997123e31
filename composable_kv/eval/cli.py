"""`ckv eval` and `ckv demo`. Each add_*_parser sets ``func(args) -> int`` (the exit code).

Flags are checked when parsed (argparse types below) and the output folder before the model loads,
so a bad input costs no evaluation: each exits with code 2 and one line that names the flag.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

DEMO_POLICIES = ("configs/dense.yaml", "configs/quest.yaml", "configs/quest_art_calibrated.yaml")
DEMO_TASKS = ("niah_single",)
DEMO_CTX = 4096
DEMO_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEMO_SAMPLES_PER_DEPTH = 2


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def depth_list(text: str) -> list[float]:
    """argparse type: comma-separated needle depths in [0, 1]."""
    try:
        depths = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        depths = []
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1] such as 0.1,0.5,0.9, "
                                         f"got {text!r}")
    return depths


def prepare_out_dir(out: str | None) -> Path:
    """Create the results folder now, before any long work, and check that it takes files."""
    from ..errors import CkvError

    path = Path(out or "ckv-results")
    if path.exists() and not path.is_dir():
        raise CkvError(f"--out {path}: an existing file, not a folder; pass a folder "
                       "(results are written into it as .md, .json and .png).")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise CkvError(f"--out {path}: cannot write there ({exc.strerror or exc}); pass a writable folder.") from exc
    return path


def _add_model_args(p) -> None:
    from ..assets import MODEL_HELP
    from .tasks import PROMPT_FORMATS

    p.add_argument("--model", metavar="NAME|PATH", default=None, help=MODEL_HELP)
    p.add_argument("--essays", metavar="DIR", default=None,
                   help="folder of .txt essays used as haystack (default: Paul Graham essays, fetched once)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="chat",
                   help="chat: the task in the model's chat template, the answer prefix opening the reply "
                        "(default); plain: the text alone")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model and KV dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="folder for the results (.md, .json, .png; default ckv-results)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_eval_parser(subparsers):
    from .tasks import TASKS

    p = subparsers.add_parser(
        "eval", help="run tasks x policies, report accuracy / fidelity and KV bytes read",
        description="Evaluate policies on long-context tasks. Writes a markdown table (also printed), "
                    "a JSON file and a PNG plot of accuracy against KV bytes read.")
    p.add_argument("--policy", action="append", required=True, metavar="YAML",
                   help="policy file (repeat for several); rows are labelled by its `name:`")
    p.add_argument("--task", action="append", default=None, choices=TASKS, metavar="TASK",
                   help=f"{', '.join(TASKS)} (repeat for several; default passkey)")
    p.add_argument("--ctx", action="append", type=positive_int, default=None,
                   help="context length in tokens, prompt plus answer (repeat; default 4096)")
    p.add_argument("--depths", type=depth_list, default=[0.1, 0.5, 0.9],
                   help="needle depths in [0,1], comma separated (default 0.1,0.5,0.9)")
    p.add_argument("--samples-per-depth", type=positive_int, default=1)
    p.add_argument("--batch-size", type=positive_int, default=4, help="prompts decoded together")
    p.add_argument("--continuation", type=positive_int, default=32,
                   help="fidelity: teacher-forced tokens per window")
    p.add_argument("--windows", type=positive_int, default=1, help="fidelity: essay windows per context length")
    p.add_argument("--seed", type=int, default=0)
    _add_model_args(p)
    p.set_defaults(func=run_eval_command)
    return p


def add_demo_parser(subparsers):
    from .tasks import RETRIEVAL_TASKS

    p = subparsers.add_parser(
        "demo", help="the default model on needle prompts and fidelity vs dense: dense, quest, quest+art",
        description="Runs the default model (fetched once) through needle-retrieval prompts at five depths "
                    "(in its chat template) and a teacher-forced fidelity check, with dense, quest and "
                    "quest+art; prints each policy's answers next to the expected ones, accuracy, KL vs dense "
                    "and the share of the KV cache read.")
    p.add_argument("--ctx", type=positive_int, default=DEMO_CTX,
                   help=f"context length (default {DEMO_CTX}: above the 1024-token budgets of the sparse policies)")
    p.add_argument("--task", action="append", default=None, metavar="TASK", choices=RETRIEVAL_TASKS,
                   help="retrieval task, repeatable (default: niah_single, a 7-digit magic number in the "
                        "essays)")
    p.add_argument("--continuation", type=positive_int, default=16, help="fidelity: teacher-forced tokens")
    p.add_argument("--policy", action="append", default=None, metavar="YAML",
                   help="replace the demo's policies (repeatable)")
    _add_model_args(p)
    p.set_defaults(func=run_demo_command)
    return p


def _setup(args):
    """Load model + tokenizer per args; return (model, tokenizer, device, model_name)."""
    import torch

    from .. import assets

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
    return model, tok, device, str(args.model or "smollm2-135m")


def _essays_text(args, task_names):
    from .tasks import needs_essays
    if not any(needs_essays(t) for t in task_names):
        return None
    from ..assets import load_essays
    return load_essays(args.essays)


def _check_policies(policies) -> None:
    from .. import hf
    from . import evaluate
    evaluate.check_distinct_names(policies, [hf.compile_policy(p) for p in policies])


def _report(rows, args, device, model_name, out_dir: Path, stem: str, sections=()) -> None:
    from . import evaluate
    meta = evaluate.run_metadata("ckv " + " ".join(shlex.quote(a) for a in sys.argv[1:]), device, model_name)
    res = evaluate.write_results(rows, out_dir, meta, stem=stem, sections=sections)
    print(res["table"])
    print(f"\nwrote {res['markdown']}, {res['json']}" + (f", {res['png']}" if res["png"] else ""))
    if res["note"]:
        print(res["note"], file=sys.stderr)


def _fail(exc: Exception) -> int:
    from ..errors import ERROR_PREFIX
    print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
    return 2


def run_eval_command(args) -> int:
    from . import evaluate
    from ..errors import CkvError

    tasks_ = args.task or ["passkey"]
    ctxs = args.ctx or [4096]
    try:
        _check_policies(args.policy)
        out_dir = prepare_out_dir(args.out)  # before the slow model load and the evaluation
        model, tok, device, name = _setup(args)
        rows = evaluate.run_eval(model, tok, args.policy, tasks_, ctxs, depths=args.depths,
                                 samples_per_depth=args.samples_per_depth, batch_size=args.batch_size,
                                 continuation=args.continuation, windows=args.windows,
                                 essays=_essays_text(args, tasks_), seed=args.seed,
                                 prompt_format=args.prompt_format, progress=not args.quiet)
    except (CkvError, FileNotFoundError, ValueError) as exc:
        return _fail(exc)
    _report(rows, args, device, name, out_dir, stem="eval")
    return 0


def run_demo_command(args) -> int:
    from . import evaluate
    from ..errors import CkvError

    policies = args.policy or list(DEMO_POLICIES)
    tasks = args.task or list(DEMO_TASKS)
    try:
        _check_policies(policies)
        out_dir = prepare_out_dir(args.out)
        model, tok, device, name = _setup(args)
        rows = evaluate.run_eval(model, tok, policies, [*tasks, "fidelity"], [args.ctx], depths=DEMO_DEPTHS,
                                 samples_per_depth=DEMO_SAMPLES_PER_DEPTH, batch_size=len(DEMO_DEPTHS),
                                 continuation=args.continuation, windows=1,
                                 essays=_essays_text(args, [*tasks, "fidelity"]),
                                 prompt_format=args.prompt_format, progress=not args.quiet)
    except (CkvError, FileNotFoundError, ValueError) as exc:
        return _fail(exc)
    summary, answers = demo_table(rows, tasks, args.ctx, name), evaluate.answers_table(rows)
    print(summary, answers, sep="\n\n", end="\n\n")
    _report(rows, args, device, name, out_dir, stem="demo", sections=(summary, answers))
    return 0


def demo_table(rows, tasks: list[str], ctx: int, model_name: str = "smollm2-135m") -> str:
    """One line per policy: retrieval accuracy per task, KL vs dense, top-1 agreement, % of KV read."""
    by_policy: dict[str, dict] = {}
    for r in rows:
        by_policy.setdefault(r.policy, {})[r.task] = r
    n = len(DEMO_DEPTHS) * DEMO_SAMPLES_PER_DEPTH
    lines = [f"composable-kv demo: {', '.join(tasks)} ({n} prompts each: {len(DEMO_DEPTHS)} depths x "
             f"{DEMO_SAMPLES_PER_DEPTH}) and fidelity vs dense, ctx={ctx}, model {model_name}",
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

