"""The demo at equal measured latency (issue #18): the demo teacher profiled on this machine (one
thread, the thread clock), then `prune train demo` three times, with a params, a MACs and a latency
target (each to --sparsity in its own measure), every run's cut calibrated onto the same latency
(pruning.cut_target_kind=latency, cut_target=--latency, refined by timing: pruning.latency_refine)
and the probe run by the report. One run at a time; a table of params, MACs, predicted and
measured latency and probe PER from each run's report.json, as JSON and markdown.

    flock /work/timing.lock python scripts/latency_demo.py --out outputs/latency_demo
    python scripts/latency_demo.py --out outputs/latency_match --match --latency 0.5   # equal budgets
    python scripts/latency_demo.py --out outputs/latency_demo trainer.prune_steps=600 ...  # shorter runs

Extra key=value arguments go to every `prune train demo`. With --match the latency run trains to
--latency itself, first, and the params and MACs runs then train to the sparsity its cut model has
in their own measure (the same budget in each measure), before each cut is calibrated onto --latency.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

KINDS = ("params", "macs", "latency")


def prune(*args: str) -> None:
    cmd = [str(Path(sys.executable).parent / "prune"), *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def row(kind: str, report: dict) -> dict:
    after, check = report["after"], report["latency_target"]
    probe = report["phone_probe"]["pruned"]
    refine = report["cut"].get("latency_refine")
    return {"target": kind, "params": after["params"], "macs_per_second": after["macs_per_second"],
            "predicted_ms": check["predicted_ms"]["pruned"], "measured_ms": check["measured_ms"]["pruned"],
            "teacher_measured_ms": check["measured_ms"]["teacher"],
            "teacher_predicted_ms": check["predicted_ms"]["teacher"],
            "refine_measured_ms": None if refine is None else refine["measured"][refine["chosen"]],
            "refine": refine, "per_mean": probe["valid_per"], "per_std": probe.get("valid_per_std"),
            "per_seeds": probe.get("valid_per_seeds")}


def markdown(rows, args) -> str:
    lines = [f"| target (train) | params | MMACs/s | predicted ms | measured ms (cut, refine) | measured ms (report) "
             f"| probe PER |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        per = f"{r['per_mean']:.3f}" + (f" +- {r['per_std']:.3f}" if r["per_std"] is not None else "")
        ref = "-" if r["refine_measured_ms"] is None else f"{r['refine_measured_ms']:.2f}"
        lines.append(f"| {r['target']} {r.get('trained_to', args.sparsity):g} | {r['params']:,} | {r['macs_per_second'] / 1e6:.1f} | "
                     f"{r['predicted_ms']:.2f} | {ref} | {r['measured_ms']:.2f} | {per} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/latency_demo")
    ap.add_argument("--sparsity", type=float, default=0.75, help="each run's training target in its own measure")
    ap.add_argument("--latency", type=float, default=0.6, help="the latency sparsity every cut is calibrated to")
    ap.add_argument("--seconds", type=float, default=4.0, help="the table's utterance length (the report's)")
    ap.add_argument("--refine", type=int, default=4, help="pruning.latency_refine: timing rounds at the cut")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--match", action="store_true", help="the latency run trains to --latency, the others to the "
                                                         "sparsity its cut reached in their measure")
    ap.add_argument("overrides", nargs="*", help="key=value for every prune train demo")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "demo_table.json"
    if not table.exists():
        prune("profile", "data/demo_teacher", "--threads", "1", "--clock", "thread", "--seconds", str(args.seconds),
              "--out", str(table))
    rows, kinds = [], args.kinds.split(",")
    targets = {kind: args.sparsity for kind in kinds}
    if args.match:  # the latency run first, at the asked latency; the others at its cut's sparsity
        kinds = ["latency"] + [k for k in kinds if k != "latency"]
        targets["latency"] = args.latency
    for kind in kinds:
        run = out / kind
        if args.match and kind != "latency":
            done = json.loads((out / "latency" / "report.json").read_text())
            key = "params" if kind == "params" else "macs_per_second"
            targets[kind] = round(1.0 - done["after"][key] / done["before"][key], 4)
        if not (run / "report.json").exists():
            prune("train", "demo", f"hydra.run.dir={run}", f"pruning.target_kind={kind}",
                  f"pruning.target={targets[kind]}", f"pruning.latency_table={table.resolve()}",
                  "pruning.cut_target_kind=latency", f"pruning.cut_target={args.latency}", "trainer.threads=1",
                  f"pruning.latency_refine={args.refine}",
                  f"trainer.latency_seconds={args.seconds}", *args.overrides)
        rows.append({**row(kind, json.loads((run / "report.json").read_text())), "trained_to": targets[kind]})
        (out / "latency_demo.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    md = markdown(rows, args)
    (out / "latency_demo.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
