"""`ckv`: validate policies, list stages, and run the demo, evaluation and benchmark."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .errors import ERROR_PREFIX, CkvError, OneLineParser


def _cmd_validate(args) -> int:
    from .config import load_policy
    from .pipeline import DecodePipeline
    failed = 0
    for path in args.files:
        try:
            pipe = DecodePipeline(load_policy(path))
        except CkvError as e:
            print(f"{ERROR_PREFIX}{e}", file=sys.stderr)
            failed += 1
            continue
        print(f"ok   {path}: {pipe.name}: " + " -> ".join(s.name for s in pipe.config.stages))
    return 1 if failed else 0


def _cmd_stages(args) -> int:
    from .stages import registered_stages
    for name, cls in registered_stages().items():
        print(f"{name}  [{cls.kind}]  {cls.summary}")
        print(f"    paper: {cls.paper}")
        for f in cls.params():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            meta = f.metadata
            extra = f" choices={list(meta['choices'])}" if meta.get("choices") else ""
            if meta.get("min") is not None or meta.get("max") is not None:
                lo, hi = meta.get("min"), meta.get("max")
                extra += f" range=[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            print(f"    {f.name}: {getattr(f.type, '__name__', f.type)} = {default!r}{extra}  # {meta.get('help', '')}")
    return 0


def _cmd_describe(args) -> int:
    import torch

    from .pipeline import compile
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(compile(args.file).describe(device))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ckv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check policy YAML files; exit 1 if any is invalid")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_cmd_validate)
    p = sub.add_parser("stages", help="list registered stages: kind, parameters, paper")
    p.set_defaults(func=_cmd_stages)
    p = sub.add_parser("describe", help="show which path and kernels a policy runs")
    p.add_argument("file")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.set_defaults(func=_cmd_describe)
    from . import traces
    from .eval import cli as eval_cli
    from .policies.attention_predictor import train as predictor_train
    from .policies.write_gate import train as gate_train
    eval_cli.add_eval_parser(sub)
    eval_cli.add_demo_parser(sub)
    traces.add_trace_parser(sub)
    predictor_train.add_train_predictor_parser(sub)
    gate_train.add_train_gate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CkvError as e:
        print(f"{ERROR_PREFIX}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
