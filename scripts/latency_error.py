"""How well a latency table predicts the latency of pruned models (issue #18): cut a preset at seeded
random gate states of several sparsities (prune.seeded), time every cut model (fastest of N) and
compare with the latency table's prediction for its config.

    flock /work/timing.lock python scripts/latency_error.py --preset hubert_base --seconds 1 --threads 1 \\
        --states 24 --json outputs/latency_error.json

By default (--joint) the profile's grid calls and the cut models are timed in ONE interleaved
round-robin, in chunks of six states: on a shared machine whose load drifts over minutes, a table
profiled at another moment than the models would measure the drift, not the table. Each chunk's
models are predicted by the table profiled in that chunk. --table FILE instead predicts every state
with one table read from FILE (profiled earlier, as a user's run would).

Prints one line per state (sparsity, measured, predicted, relative error) and the mean and worst
absolute relative error; --json writes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from prune.compile import compile_encoder
from prune.latency import LatencyTable, load_table, save_table
from prune.latency_profile import CLOCKS, check_clock, plan
from prune.measured import fastest, interleaved
from prune.models import SAMPLE_RATE, build_encoder, preset_config
from prune.seeded import set_random_gates
from prune.structures import GatedEncoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="hubert_base")
    ap.add_argument("--model", default=None, help="time this checkpoint's architecture instead of --preset "
                                                  "(e.g. data/demo_teacher; random weights, the same shapes)")
    ap.add_argument("--fit-states", type=int, default=0, help="cut models the profile times whole for its line "
                                                              "(prune profile --fit-states; 0: the scale alone)")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--states", type=int, default=24, help="seeded random gate states")
    ap.add_argument("--repeats", type=int, default=10, help="timed passes per model, interleaved")
    ap.add_argument("--conv-points", type=int, default=4)
    ap.add_argument("--ffn-points", type=int, default=8)
    ap.add_argument("--table", default=None, help="predict with this table (default: profile in each chunk, jointly)")
    ap.add_argument("--save-table", default=None, help="write the first chunk's table here")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="thread: this thread's CPU time (--threads 1), immune to other processes' load")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    check_clock(args.clock, args.threads, "cpu")
    torch.set_num_threads(args.threads)
    if args.model is not None:
        from prune.checkpoints import load_pretrained

        config = load_pretrained(args.model).config
    else:
        config = preset_config(args.preset)
    table = load_table(args.table) if args.table else None
    x = torch.randn(args.batch, int(round(args.seconds * SAMPLE_RATE)))
    levels = [0.2, 0.4, 0.6, 0.75, 0.85, 0.9]
    rows, tables = [], []
    t0 = time.perf_counter()
    # the states in chunks of one per sparsity level plus the unpruned model (six HuBERT Base copies
    # at a time in memory, not all of them), each chunk timed interleaved, fastest of N
    for start in range(0, args.states, len(levels)):
        models, sparsities = {"unpruned": build_encoder(config).eval()}, {"unpruned": 0.0}
        for i in range(start, min(start + len(levels), args.states)):
            torch.manual_seed(i)
            gated = GatedEncoder(build_encoder(config))
            sparsities[i] = set_random_gates(gated, levels[i % len(levels)], seed=i)
            gated.eval()
            models[i] = compile_encoder(gated).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
            fns = {f"model:{k}": (lambda m=m: m(x)) for k, m in models.items()}
            grid = None
            if table is None:
                grid = plan(config, args.seconds, args.batch, args.threads, conv_points=args.conv_points,
                            ffn_points=args.ffn_points, fit_states=args.fit_states)
                fns.update(grid.fns)
            times = interleaved(fns, args.repeats, warmup=2, clock=CLOCKS[args.clock])
        chunk_table = table if grid is None else LatencyTable(grid.table(times, args.repeats, args.clock))
        tables.append(chunk_table)
        for k, m in models.items():
            measured, predicted = fastest(times[f"model:{k}"]), chunk_table.latency(m.config)
            err = (predicted - measured) / measured
            rows.append({"state": k, "chunk": len(tables) - 1, "param_sparsity": sparsities[k],
                         "measured_ms": measured * 1e3, "predicted_ms": predicted * 1e3, "relative_error": err})
            print(f"{k!s:>8}  param sparsity {sparsities[k]:.3f}  measured {measured * 1e3:8.2f} ms  "
                  f"predicted {predicted * 1e3:8.2f} ms  error {err:+.1%}", flush=True)
    if args.save_table and table is None:
        save_table(tables[0].data, args.save_table)
    elapsed = time.perf_counter() - t0
    errs = [abs(r["relative_error"]) for r in rows if r["state"] != "unpruned"]
    full = [r["measured_ms"] for r in rows if r["state"] == "unpruned"]
    summary = {"preset": args.model or args.preset, "fit_states": args.fit_states, "seconds": args.seconds, "batch": args.batch, "threads": args.threads,
               "states": args.states, "repeats": args.repeats, "elapsed_seconds": elapsed,
               "joint": table is None, "clock": args.clock, "unpruned_measured_ms_per_chunk": full,
               "mean_abs_relative_error": statistics.mean(errs), "worst_abs_relative_error": max(errs),
               "mean_signed_relative_error": statistics.mean(r["relative_error"] for r in rows
                                                             if r["state"] != "unpruned"),
               "cpu": tables[0].data["machine"]["cpu"], "torch": tables[0].data["machine"]["torch"]}
    print(f"over {len(errs)} pruned models: mean |error| {summary['mean_abs_relative_error']:.1%}, worst "
          f"{summary['worst_abs_relative_error']:.1%}, mean signed {summary['mean_signed_relative_error']:+.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
