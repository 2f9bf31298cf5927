"""Side by side: pruned runs (e.g. uniform vs free shape): params, MACs, CPU latency of prune's model and,
where transformers holds the shape, of the transformers model `prune convert --to hf` writes, and the
probe PER from each run's report.

    python scripts/compare_shapes.py free=outputs/demo uniform=outputs/demo_uniform --seconds 4 --repeats 20

transformers' model gets the waveform as prune's model prepares it (normalised where the model was
pre-trained so: the feature extractor's job there). A run whose export transformers cannot hold is
shown with the refusal's reason. Run it alone on the machine (latencies are interleaved best-of-N).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import prune
from prune.checkpoints.convert import write_model
from prune.evaluate.report import format_table
from prune.measured import fastest, interleaved, measured_macs, num_params, spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR (a finished `prune train` run: export/, report.json)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    wave = torch.randn(1, int(args.seconds * 16000))
    rows, fns, per = [], {}, {}
    scratch = tempfile.TemporaryDirectory()
    tmp = Path(scratch.name)
    for spec in args.runs:
        name, run = spec.split("=", 1)
        run = Path(run)
        model = prune.load_pruned(run / "export").eval()
        report = json.loads((run / "report.json").read_text())
        probe = report.get("phone_probe", {}).get("pruned", {})
        per[name] = f"{probe['valid_per']:.3f} +- {probe.get('valid_per_std', 0):.3f}" if probe else "-"
        fns[f"{name} (prune)"] = lambda m=model: m(wave)
        try:
            write_model(model, tmp / name, to="hf")
            import transformers

            hf = transformers.AutoModel.from_pretrained(tmp / name).eval()
            prepared = model.prepare_waveforms(wave)
            fns[f"{name} (transformers)"] = lambda m=hf, x=prepared: m(x)
            hf_note = f"{sum(p.numel() for n, p in hf.named_parameters() if 'masked_spec_embed' not in n):,}"
        except ValueError as e:  # the refusal: "--to hf: transformers' XModel cannot hold this model: REASON; ..."
            hf_note = "refused: " + str(e).split(" cannot hold this model: ", 1)[-1].split(";")[0][:70]
        rows.append([name, f"{num_params(model):,}", f"{measured_macs(model) / 1e9:.4f}", hf_note])
    with torch.inference_mode():
        times = interleaved(fns, repeats=args.repeats)
    scratch.cleanup()
    print(format_table([["run", "params", "GMACs / s", "transformers params"], *rows]))
    print()
    print(format_table([["model", f"CPU latency ({args.seconds:g} s, batch 1, {args.threads} threads)", "median / max"],
                        *[[k, f"{fastest(t) * 1e3:.2f} ms", spread(t)] for k, t in times.items()]]))
    print()
    print(format_table([["run", "probe PER (pruned)"], *[[k, v] for k, v in per.items()]]))


if __name__ == "__main__":
    main()
