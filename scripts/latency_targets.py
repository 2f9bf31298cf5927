"""The latency target against the MACs and params targets at HuBERT Base shape (issue #18), as
scripts/benchmark.py's section 2 runs them: fresh gates driven by the Lagrangian alone (no
distillation) to the same sparsity in each measure, then every model's thresholds shifted together
(keeping each run's learned order) until the latency table reads the same latency, cut, and all
cut models timed side by side. At equal (predicted and measured) latency: what each target kept.

    flock /work/timing.lock python scripts/latency_targets.py --table outputs/latency_hubert_base_1s_t1.json
    flock /work/timing.lock python scripts/latency_targets.py --table ... --refine 2   # timed at the cut

--refine N: after the table calibration, each cut is timed against the unpruned model and
re-calibrated N rounds (prune.latency_refine, what pruning.latency_refine does in a run).

The table fixes the utterance length, batch, threads and clock of the timing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import prune
from prune.calibrate import calibrate
from prune.lagrangian import Lagrangian
from prune.latency import load_table
from prune.latency_profile import CLOCKS
from prune.latency_refine import refine, skip_reason
from prune.measured import fastest, interleaved, spread
from prune.models import SAMPLE_RATE, build_preset
from prune.structures import GatedEncoder, count_macs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", required=True)
    ap.add_argument("--preset", default="hubert_base")
    ap.add_argument("--sparsity", type=float, default=0.75, help="each target's sparsity in its own measure, and "
                                                                 "the latency sparsity all are calibrated to")
    ap.add_argument("--steps", type=int, default=400, help="Lagrangian steps (as benchmark.py section 2)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--refine", type=int, default=0, help="timing rounds at the cut (pruning.latency_refine)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    table = load_table(args.table)
    torch.set_num_threads(table.threads)
    settings = {"table": table}
    full = build_preset(args.preset).eval()
    table.check_model(full.config)
    latency = Lagrangian(GatedEncoder(build_preset(args.preset)), "latency", args.sparsity, 0, settings=settings)
    models = {"unpruned": full}
    refined = {}
    for kind in ("params", "macs", "latency"):
        torch.manual_seed(0)
        gated = GatedEncoder(build_preset(args.preset))
        gated.model.load_state_dict(full.state_dict())
        gated.train()
        lag = Lagrangian(gated, kind, args.sparsity, warmup_steps=args.steps // 2, settings=settings)
        opt = torch.optim.Adam([{"params": gated.gate_parameters(), "lr": 0.05},
                                {"params": list(lag.parameters()), "lr": 0.05}])
        for step in range(args.steps):
            opt.zero_grad()
            lag(gated, step)["penalty"].backward()
            lag.flip_grads()
            opt.step()
        calibrate(gated, latency.expected_size, latency.target_size, 0.005)  # all at the same table latency
        if args.refine:
            why = skip_reason(table)
            if why is not None:
                raise SystemExit(f"--refine: {why}")
            refined[kind] = refine(gated, full, latency.expected_size, table, latency.target_size, latency.full,
                                   0.005, args.refine)
            print(f"{kind}: refined, measured per round {[round(m, 2) for m in refined[kind]['measured']]} ms for "
                  f"{latency.target_size:.2f} asked, chose {refined[kind]['chosen']}", flush=True)
        models[kind] = prune.compile_encoder(gated).eval()
        print(f"{kind}: driven and cut", flush=True)
    x = torch.randn(table.batch, int(round(table.seconds * SAMPLE_RATE)))
    with torch.no_grad():
        times = interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, args.repeats, warmup=2,
                            clock=CLOCKS[table.data.get("clock", "wall")])
    rows = []
    print(f"\nLagrangian alone ({args.steps} steps) to sparsity {args.sparsity} in each measure, then calibrated to "
          f"latency sparsity {args.sparsity} on the table ({table.seconds:g} s, batch {table.batch}, "
          f"{table.threads} thread(s), {table.data.get('clock', 'wall')} clock)")
    print(f"{'target':10} {'params':>9} {'GMACs/s':>8} {'heads':>6} {'FFN units':>10} {'conv ch.':>9} "
          f"{'predicted':>10} {'measured':>9} {'median/max':>10} {'vs asked':>9}")
    for kind, m in models.items():
        c = m.config
        r = {"target": kind, "params": prune.num_params(m), "gmacs_per_s": count_macs(c) / 1e9,
             "heads": sum(h for h, kept in zip(c.encoder_num_heads, c.encoder_attention_kept) if kept),
             "ffn_units": sum(u for u, kept in zip(c.encoder_ff_interm_features, c.encoder_ff_kept) if kept),
             "conv_channels": sum(ch for ch, _, _ in c.extractor_conv_layer_config),
             "predicted_ms": 1e3 * table.latency(c), "measured_ms": 1e3 * fastest(times[kind]),
             # on the table's scale (as the refinement reads it): t(model) / t(unpruned) x the table's unpruned
             "measured_on_table_ms": fastest(times[kind]) / fastest(times["unpruned"]) * 1e3 * table.latency(
                 full.config), "asked_ms": latency.target_size, "refine": refined.get(kind)}
        rows.append(r)
        print(f"{kind:10} {r['params'] / 1e6:8.2f}M {r['gmacs_per_s']:8.2f} {r['heads']:6d} {r['ffn_units']:10d} "
              f"{r['conv_channels']:9d} {r['predicted_ms']:8.1f}ms {r['measured_ms']:7.1f}ms {spread(times[kind]):>10} "
              f"{(r['measured_on_table_ms'] / r['asked_ms'] - 1) * 100:+8.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
