"""The ``prune`` command line.

    prune demo [--preset hubert_base] [--sparsity 0.75]   gate, cut and export a preset
    prune inspect PATH                                     size and structure of a checkpoint
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import List, Optional

import torch


def _table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _layers(values: List[Optional[int]]) -> str:
    return " ".join("-" if v is None else str(v) for v in values)


@torch.no_grad()
def _latency(model: torch.nn.Module, *inputs: torch.Tensor, repeats: int = 3) -> float:
    model(*inputs)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(*inputs)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def demo(args: argparse.Namespace) -> int:
    """Gate a preset, set its gates to a seeded non-uniform state at the chosen sparsity, cut it
    to a plain model, check it against the gated model, export it and print before/after."""
    from .checkpoints import check_export_path, describe, export_pruned
    from .compile import compile_encoder
    from .models import SAMPLE_RATE, build_preset
    from .seeded import set_random_gates
    from .structures import GatedEncoder

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = check_export_path(args.out, args.overwrite)  # fail before any compute
    print(f"building {args.preset} (random weights) and gating it ...")
    gated = GatedEncoder(build_preset(args.preset))
    reached = set_random_gates(gated, args.sparsity, seed=args.seed)
    gated.eval()
    compiled = compile_encoder(gated)

    x = torch.randn(2, int(args.seconds * SAMPLE_RATE))
    lengths = torch.tensor([x.shape[1], x.shape[1] * 3 // 4])
    with torch.no_grad():
        expected, _ = gated(x, lengths)
        actual, _ = compiled(x, lengths)
    t_full, t_pruned = _latency(gated.model, x, lengths), _latency(compiled, x, lengths)
    error = max(((a - e).abs().max() / e.abs().max()).item() for a, e in zip(actual, expected))
    path = export_pruned(compiled, out, source=gated.config, overwrite=args.overwrite,
                         metadata={"demo": {"preset": args.preset, "sparsity": args.sparsity, "seed": args.seed}})

    before, after = describe(gated.config), describe(compiled.config)
    rows = [["", "unpruned", "pruned", "ratio"],
            ["params", f"{before['params']:,}", f"{after['params']:,}", f"{after['params'] / before['params']:.3f}"],
            ["GMACs / s of audio", f"{before['macs_per_second'] / 1e9:.3f}", f"{after['macs_per_second'] / 1e9:.3f}",
             f"{after['macs_per_second'] / before['macs_per_second']:.3f}"],
            [f"CPU forward, 2 x {args.seconds:g} s (median of 3)", f"{t_full:.3f} s", f"{t_pruned:.3f} s",
             f"{t_pruned / t_full:.3f}"]]
    print(_table(rows))
    print(f"param sparsity reached: {reached:.4f} (asked {args.sparsity})")
    print(f"conv channels : {_layers(after['conv_channels'])}")
    print(f"heads         : {_layers(after['heads'])}   ('-' = attention block removed)")
    print(f"FFN units     : {_layers(after['ffn_units'])}   ('-' = FFN block removed)")
    print(f"pruned vs gated model, max relative error over all hidden states: {error:.2e}")
    print(f"exported to {path}  (load with: prune.load_pruned({str(path)!r}))")
    return 0


def inspect(args: argparse.Namespace) -> int:
    from .checkpoints.inspect import inspect_checkpoint

    print(inspect_checkpoint(args.path))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="gate, cut and export a preset at a chosen sparsity")
    p.add_argument("--preset", default="hubert_base", help="a name from prune.models.PRESETS")
    p.add_argument("--sparsity", type=float, default=0.75, help="fraction of parameters to remove, in [0, 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=2.0, help="length of the check utterances")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="outputs/demo", help="export folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    p.set_defaults(func=demo)
    p = sub.add_parser("inspect", help="architecture, size and per-layer structure of a checkpoint")
    p.add_argument("path")
    p.set_defaults(func=inspect)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    from .checkpoints import ExportError
    from .models import PRESETS

    if getattr(args, "preset", None) is not None and args.preset not in PRESETS:
        raise SystemExit(f"prune demo: unknown --preset {args.preset!r}; choose from {', '.join(sorted(PRESETS))}")
    if getattr(args, "sparsity", None) is not None and not 0.0 <= args.sparsity < 1.0:
        raise SystemExit(f"prune demo: --sparsity must be in [0, 1), got {args.sparsity}")
    try:
        raise SystemExit(args.func(args))
    except (ValueError, OSError, ExportError) as e:  # bad input: one line, no traceback
        raise SystemExit(f"prune {args.command}: {e}")


if __name__ == "__main__":
    main()
