"""Benchmarks: does pruning make the encoder faster, and what does the trainer's step cost?

    python scripts/benchmark.py            # the full suite, about 15 minutes on 2 cores
    python scripts/benchmark.py --quick    # a few minutes: shorter audio, fewer repeats

Every figure is a ratio of timings taken side by side in this run (interleaved, threads fixed,
the fastest of the repeats, with the median and max above it as the spread); the machine is
shared and noisy, absolute times are not comparable across runs. Writes a table to stdout and results.json + speedup.png to --out.

1. inference: HuBERT Base (random weights), cut at 50/75/90% param sparsity with seeded
   non-uniform gates; latency vs the unpruned model against the MAC reduction.
2. target kind: the same budget reached through a params target and through a MACs target
   (gates driven by the Lagrangian alone, then cut); latency of each.
3. training step: teacher forward + gated student forward/backward + optimizer at HuBERT Base,
   batch 2 x 4 s, vs the same student with no gates; with sparsity-aware skipping on and off at
   gate states typical of 0/50/75/90% sparsity; peak memory of the step.
4. exactness at scale: gated (eval) vs compiled hidden states, expected vs actual params.
5. conv widths: MAC throughput of one conv layer of the extractor at its full width (512), at a
   pruned odd width, and at that width padded to multiples of 8 (are narrow layers slow?).
6. ONNX Runtime: the models of 1 exported with `prune convert`'s exporter, float32 and int8
   (dynamic, MatMul weights), vs torch eager; batch 1 and 4 (needs `pip install 'prune[onnx]'`).
8. structures (#17): HuBERT Base at 75% and 90% params removed with the default gates, with the
   hidden dimension gated too (and every further gate kind `GateConfig` has), and at 75% with
   `round_to=8`: the same seeded gate procedure for each, MACs, kept heads / FFN units, latency at
   batch 1 and 4 and speedup against MAC cut (on request: `--sections 8`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import torch

import prune
from prune.calibrate import calibrate
from prune.measured import fastest, interleaved, spread
from prune.models import build_preset
from prune.seeded import set_random_gates
from prune.shape import Shaper
from prune.structures import GateConfig, GatedEncoder, count_macs
from prune.lagrangian import Lagrangian
from prune.evaluate.report import format_table

PRESET = "hubert_base"
SPARSITIES = (0.5, 0.75, 0.9)


# ----------------------------------------------------------------------------------- 1 and 4
def seeded_cut(full, preset: str, sparsity: float, gates: Optional[GateConfig] = None, round_to: int = 1):
    """(the gated model in eval, its cut): ``full``'s weights under ``gates``, every gate drawn by the
    seeded procedure (seed 1: random per-group levels shifted together to the params target, kept
    counts rounded to multiples of ``round_to``)."""
    gated = GatedEncoder(build_preset(preset), gates or GateConfig())
    gated.model.load_state_dict(full.state_dict())
    size = Shaper(round_to=round_to).sized(GatedEncoder.expected_params) if round_to > 1 else None
    set_random_gates(gated, sparsity, seed=1, size=size)
    gated.eval()
    return gated, prune.compile_encoder(gated)


def pruned_models(preset: str):
    """{"unpruned": model, "50%": ..., ...}: random weights (seed 0), then each sparsity of SPARSITIES
    reached with seeded random gates (``seeded_cut``) and cut; also yields each gated model for checks."""
    torch.manual_seed(0)
    full = build_preset(preset).eval()
    models, gated_models = {"unpruned": full}, {}
    for s in SPARSITIES:
        gated_models[s], models[f"{int(s * 100)}%"] = seeded_cut(full, preset, s)
    return models, gated_models


def inference(args) -> Dict:
    models, gated_models = pruned_models(args.preset)
    full = models["unpruned"]
    exactness = []
    x_check = torch.randn(2, 16000 * 2)
    lengths = torch.tensor([32000, 24000])
    for s, gated in gated_models.items():
        compiled = models[f"{int(s * 100)}%"]
        with torch.no_grad():
            a, _ = gated(x_check, lengths)
            b, _ = compiled(x_check, lengths)
        err = max(((u - v).abs().max() / v.abs().max()).item() for u, v in zip(b, a))
        exactness.append({"sparsity": s, "max_rel_error": err, "expected_params": int(gated.expected_params().item()),
                          "actual_params": prune.num_params(compiled)})
    rows, results = [], []
    for batch in (1, 4):
        x = torch.randn(batch, int(args.seconds * 16000))
        fns = {k: (lambda m=m: m(x)) for k, m in models.items()}
        with torch.no_grad():
            times = interleaved(fns, args.repeats)
        base = fastest(times["unpruned"])
        for name, m in models.items():
            mac_ratio = count_macs(full.config, args.seconds) / count_macs(m.config, args.seconds)
            speedup = base / fastest(times[name])
            results.append({"model": name, "batch": batch, "params": prune.num_params(m),
                            "gmacs_per_s": count_macs(m.config, 1.0) / 1e9, "latency_s": fastest(times[name]),
                            "spread": spread(times[name]), "speedup": speedup, "mac_reduction": mac_ratio})
            rows.append([name, str(batch), f"{prune.num_params(m) / 1e6:.2f} M", f"{count_macs(m.config) / 1e9:.2f}",
                         f"{fastest(times[name]):.3f} s", spread(times[name]), f"{speedup:.2f}x", f"{mac_ratio:.2f}x",
                         f"{speedup / mac_ratio:.2f}"])
    print(f"\n1. Inference, {args.preset}, {args.seconds:g} s of audio, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}")
    print(format_table([["model", "batch", "params", "GMACs/s", "latency", "median/max", "speedup", "MAC cut",
                         "speedup / MAC cut"]] + rows))
    print("\n4. Exactness at scale (gated eval vs compiled, 2 x 2 s, padded)")
    print(format_table([["sparsity", "max rel. error", "expected params", "actual params"]]
                       + [[f"{e['sparsity']:.2f}", f"{e['max_rel_error']:.1e}", f"{e['expected_params']:,}",
                           f"{e['actual_params']:,}"] for e in exactness]))
    return {"inference": results, "exactness": exactness, "models": models}


# ------------------------------------------------------------------------------------- 8
# section 8's gate variants: the default gates, then each new kind on top of them, then all together
NEW_GATES = {"+hidden_dim": ("hidden_dim",), "+head dims": ("head_qk_dims", "head_v_dims"),
             "+hidden_dim +head dims": ("hidden_dim", "head_qk_dims", "head_v_dims")}


def structure_variants(preset: str):
    """{name: compiled model} of section 8, all cut from the same random weights with the same
    seeded gate procedure (seed 1) as section 1."""
    torch.manual_seed(0)
    full = build_preset(preset).eval()
    variants = {"unpruned": full}
    for sparsity in (0.75, 0.9):
        runs = [("default", GateConfig(), 1)]
        runs += [(label, GateConfig(**{k: True for k in kinds}), 1) for label, kinds in NEW_GATES.items()]
        runs += [("default, round_to=8", GateConfig(), 8), ("default, round_to=16", GateConfig(), 16)] \
            if sparsity == 0.75 else []
        for label, gates, round_to in runs:
            variants[f"{int(sparsity * 100)}% {label}"] = seeded_cut(full, preset, sparsity, gates, round_to)[1]
    return variants


def structures(args) -> Dict:
    models = structure_variants(args.preset)
    full = models["unpruned"]
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    rows, results = [], []
    for batch in (1, 4):
        x = torch.randn(batch, int(args.seconds * 16000))
        with torch.no_grad():
            times = interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, args.repeats, clock=clock)
        base = fastest(times["unpruned"])
        for name, m in models.items():
            c = m.config
            heads = sum(h for h, kept in zip(c.encoder_num_heads, c.encoder_attention_kept) if kept)
            units = sum(u for u, kept in zip(c.encoder_ff_interm_features, c.encoder_ff_kept) if kept)
            mac_cut = count_macs(full.config, args.seconds) / count_macs(c, args.seconds)
            speedup = base / fastest(times[name])
            results.append({"model": name, "batch": batch, "params": prune.num_params(m), "hidden": c.encoder_embed_dim,
                            "heads": heads, "ffn_units": units, "gmacs_per_s": count_macs(c, 1.0) / 1e9,
                            "latency_s": fastest(times[name]), "spread": spread(times[name]), "speedup": speedup,
                            "mac_reduction": mac_cut})
            qk = _mean_kept_dims(c, "encoder_head_qk_dims")
            results[-1]["mean_qk_dims"] = qk
            rows.append([name, str(batch), f"{prune.num_params(m) / 1e6:.2f} M", str(c.encoder_embed_dim), str(heads), qk,
                         str(units), f"{count_macs(c) / 1e9:.2f}", f"{fastest(times[name]):.3f} s",
                         spread(times[name]), f"{speedup:.2f}x", f"{mac_cut:.2f}x", f"{speedup / mac_cut:.2f}"])
    print(f"\n8. Structures, {args.preset}, {args.seconds:g} s of audio, {torch.get_num_threads()} threads, "
          f"{args.clock} clock, best of {args.repeats}")
    print(format_table([["model", "batch", "params", "hidden", "heads", "qk dims", "FFN units", "GMACs/s", "latency",
                         "median/max", "speedup", "MAC cut", "speedup / MAC cut"]] + rows))
    return {"structures": results}


def _mean_kept_dims(c, field: str) -> str:
    """The mean head size (of ``encoder_head_dim``) over the layers that keep heads, or "all"."""
    layers = [i for i, (h, a) in enumerate(zip(c.encoder_num_heads, c.encoder_attention_kept)) if h and a]
    dims = getattr(c, field, None)
    if not layers or dims is None:
        return "-" if not layers else "all"
    kept = [dims[i] for i in layers]
    return f"{sum(kept) / len(kept):.0f}" if kept else "-"


# ------------------------------------------------------------------------------------- 2
def target_kinds(args, full) -> Dict:
    """Drive fresh gates to the same sparsity with a params target and with a MACs target, using
    the Lagrangian alone, then cut and time both."""
    sparsity, out = 0.75, {}
    for kind in ("params", "macs"):
        torch.manual_seed(0)
        gated = GatedEncoder(build_preset(PRESET))
        gated.model.load_state_dict(full.state_dict())
        gated.train()
        lag = Lagrangian(gated, kind, sparsity, warmup_steps=args.lagrangian_steps // 2)
        opt = torch.optim.Adam([{"params": gated.gate_parameters(), "lr": 0.05},
                                {"params": list(lag.parameters()), "lr": 0.05}])
        for step in range(args.lagrangian_steps):
            opt.zero_grad()
            lag(gated, step)["penalty"].backward()
            lag.flip_grads()
            opt.step()
        calibrate(gated, lag.expected_size, (1 - sparsity) * lag.full, 0.005)
        out[kind] = prune.compile_encoder(gated)
    x = torch.randn(1, int(args.seconds * 16000))
    with torch.no_grad():
        times = interleaved({"unpruned": lambda: full(x), **{k: (lambda m=m: m(x)) for k, m in out.items()}},
                            args.repeats)
    rows, results = [], []
    for kind, m in out.items():
        r = {"target": f"{kind} sparsity {sparsity}", "params": prune.num_params(m),
             "gmacs_per_s": count_macs(m.config) / 1e9, "latency_s": fastest(times[kind]),
             "speedup": fastest(times["unpruned"]) / fastest(times[kind])}
        results.append(r)
        rows.append([r["target"], f"{r['params'] / 1e6:.2f} M", f"{r['gmacs_per_s']:.2f}", f"{r['latency_s']:.3f} s",
                     spread(times[kind]), f"{r['speedup']:.2f}x"])
    print(f"\n2. Params target vs MACs target at sparsity {sparsity} (gates driven by the Lagrangian alone, "
          f"{args.lagrangian_steps} steps; batch 1, {args.seconds:g} s)")
    print(format_table([["target", "params", "GMACs/s", "latency", "median/max", "speedup"]] + rows))
    return {"target_kinds": results}


# ------------------------------------------------------------------------------------- 3
STEP_CODE = r"""
import json, resource, sys, time, torch
import prune
from prune.models import build_preset
from prune.seeded import set_random_gates
from prune.structures import GatedEncoder
from prune.train.distill import DistillHeads, distill_loss, frame_mask
mode, sparsity, repeats, seconds, threads = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
extra = [k for k in sys.argv[6].split(",") if k]  # gate kinds besides the default ones (--step-gates)
from prune.structures import GateConfig
torch.set_num_threads(threads)
torch.manual_seed(0)
kw = dict(encoder_layer_drop=0.0)
teacher = build_preset("hubert_base", **kw).eval().requires_grad_(False)
if mode == "plain":
    student = build_preset("hubert_base", **kw)
else:
    student = GatedEncoder(build_preset("hubert_base", **kw), GateConfig(**{k: True for k in extra}),
                           skip_closed=(mode == "skip"))
    if sparsity > 0:
        set_random_gates(student, sparsity, seed=1)
(student if mode == "plain" else student.model).load_state_dict(teacher.state_dict())
student.train()
heads = DistillHeads(768, [[0], [4, 8, 12]])
opt = torch.optim.AdamW(list(student.parameters()) + list(heads.parameters()), lr=1e-5)
x = torch.randn(2, int(seconds * 16000)); lengths = torch.tensor([x.shape[1], x.shape[1] * 3 // 4])
def step():
    with torch.no_grad():
        t, _ = teacher(x, lengths)
    h, frames = student(x, lengths)
    loss, _ = distill_loss(heads(h), [t[i] for i in heads.layers], frame_mask(frames, h[0].shape[1]))
    if mode != "plain":
        loss = loss + student.expected_params() * 1e-9
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
step()
times = []
for _ in range(repeats):
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def training_step(args) -> Dict:
    """Each configuration in its own process: clean peak-memory figures, no cross-talk."""
    configs = [("plain", 0.0)] + [(m, s) for s in (0.0, 0.5, 0.75, 0.9) for m in ("full", "skip")]
    results = {}
    for rep in range(args.step_rounds):  # rounds interleave the configurations
        for mode, s in configs:
            out = subprocess.run([sys.executable, "-c", STEP_CODE, mode, str(s), str(args.step_repeats),
                                  str(args.step_seconds), str(torch.get_num_threads()), args.step_gates],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            entry = results.setdefault((mode, s), {"times": [], "maxrss_mb": 0.0})
            entry["times"] += r["times"]
            entry["maxrss_mb"] = max(entry["maxrss_mb"], r["maxrss_mb"])
    plain = fastest(results[("plain", 0.0)]["times"])
    rows, out = [], []
    for (mode, s), r in results.items():
        t = fastest(r["times"])
        full_t = fastest(results[("full", s)]["times"]) if mode != "plain" else t
        label = {"plain": "no gates", "full": "gated, skipping off", "skip": "gated, skipping on"}[mode]
        out.append({"config": label, "sparsity": s, "step_s": t, "vs_no_gates": t / plain,
                    "vs_skipping_off": t / full_t, "peak_rss_mb": r["maxrss_mb"]})
        rows.append([label, f"{s:.2f}", f"{t:.2f} s", spread(r["times"]), f"{t / plain:.2f}x",
                     f"{t / full_t:.2f}x", f"{r['maxrss_mb']:.0f} MB"])
    gates = f", gates + {args.step_gates}" if args.step_gates else ""
    print(f"\n3. Training step, {PRESET}{gates}, batch 2 x {args.step_seconds:g} s, teacher included, "
          f"{torch.get_num_threads()} threads, best of {args.step_rounds * args.step_repeats}")
    print(format_table([["student", "gate sparsity", "step", "median/max", "vs no gates", "vs skipping off",
                         "peak RSS"]] + rows))
    return {"training_step": out, "training_step_gates": args.step_gates}


def plot(results: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for batch, marker in ((1, "o"), (4, "s")):
        pts = [r for r in results["inference"] if r["batch"] == batch and r["model"] != "unpruned"]
        ax.plot([r["mac_reduction"] for r in pts], [r["speedup"] for r in pts], marker=marker,
                label=f"batch {batch}")
        for r in pts:
            ax.annotate(r["model"], (r["mac_reduction"], r["speedup"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=8)
    top = max(r["mac_reduction"] for r in results["inference"]) * 1.1
    ax.plot([1, top], [1, top], "k--", lw=0.8, label="speedup = MAC cut")
    ax.plot([1, top], [0.9, 0.9 * top], "k:", lw=0.8, label="0.9 x MAC cut (goal)")
    ax.set_xlabel("MAC reduction (x)")
    ax.set_ylabel("CPU speedup (x)")
    ax.set_title(f"{results.get('preset', PRESET)}: pruned vs unpruned, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- 5
CONV_SHAPES = [  # (in, out, kernel, stride, input frames per 10 s), layer 1 and layer 5 of the extractor
    ("layer 1, full", 512, 512, 3, 2, 31999), ("layer 1, pruned", 173, 181, 3, 2, 31999),
    ("layer 1, pruned, padded to x8", 176, 184, 3, 2, 31999), ("layer 5, full", 512, 512, 2, 2, 1999),
    ("layer 5, pruned", 131, 97, 2, 2, 1999), ("layer 5, pruned, padded to x8", 136, 104, 2, 2, 1999)]


def conv_widths(args) -> Dict:
    """MACs per microsecond of single conv layers (random weights, batch 1, 10 s of audio)."""
    import torch.nn.functional as F

    fns, macs = {}, {}
    for name, cin, cout, k, stride, frames in CONV_SHAPES:
        x, w = torch.randn(1, cin, frames), torch.randn(cout, cin, k)
        fns[name] = (lambda x=x, w=w, stride=stride: F.conv1d(x, w, stride=stride))
        macs[name] = cin * cout * k * ((frames - k) // stride + 1)
    times = interleaved(fns, repeats=max(args.repeats * 4, 10), warmup=2)
    rows, out = [], {}
    for name, *_ in CONV_SHAPES:
        t = fastest(times[name])
        out[name] = {"seconds": t, "macs_per_us": macs[name] / t / 1e6}
        rows.append([name, f"{macs[name] / 1e6:.0f} M", f"{t * 1e3:.2f} ms", spread(times[name]),
                     f"{out[name]['macs_per_us']:.0f}"])
    print("\n5. conv widths: one extractor conv layer, 10 s, batch 1")
    print(format_table([["layer", "MACs", "time", "median/max", "MACs / us"]] + rows))
    return {"conv_widths": out}


# ----------------------------------------------------------------------------------------- 6
def onnx_runtime(args, models: Dict) -> Dict:
    """onnxruntime (float32 and int8 MatMul weights) vs torch eager, the same models side by side,
    interleaved; each graph is exported with prune's exporter and checked against torch first."""
    import tempfile

    from prune.checkpoints.onnx_export import export_onnx, onnx_session, verify_onnx

    sessions, errors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in models.items():
            for quantize in (None, "int8"):
                path = export_onnx(m, Path(tmp) / f"{name.strip('%')}_{quantize or 'f32'}.onnx", quantize=quantize)
                key = (name, quantize or "float32")
                errors[key] = max(verify_onnx(path, m).values())
                sessions[key] = onnx_session(path, torch.get_num_threads())
    rows, results = [], []
    for batch in (1, 4):
        x = torch.randn(batch, int(args.seconds * 16000))
        lengths = torch.full((batch,), x.shape[1], dtype=torch.long)
        feed = {"waveforms": x.numpy(), "lengths": lengths.numpy()}
        fns = {}
        for name, m in models.items():
            fns[(name, "torch")] = lambda m=m: m(x, lengths)
            for kind in ("float32", "int8"):
                fns[(name, kind)] = lambda s=sessions[(name, kind)]: s.run(None, feed)
        with torch.no_grad():
            times = interleaved(fns, args.repeats)
        for name in models:
            eager = fastest(times[(name, "torch")])
            for kind in ("torch", "float32", "int8"):
                t = fastest(times[(name, kind)])
                err = errors.get((name, kind))
                results.append({"model": name, "batch": batch, "runtime": kind, "latency_s": t,
                                "spread": spread(times[(name, kind)]), "vs_torch": eager / t, "max_rel_error": err})
                rows.append([name, str(batch), "torch eager" if kind == "torch" else f"onnxruntime {kind}",
                             f"{t:.3f} s", spread(times[(name, kind)]), f"{eager / t:.2f}x",
                             "-" if err is None else f"{err:.1e}"])
    print(f"\n6. ONNX Runtime vs torch eager, {args.preset}, {args.seconds:g} s of audio, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}, interleaved")
    print(format_table([["model", "batch", "runtime", "latency", "median/max", "speedup vs torch",
                         "max rel. error"]] + rows))
    return {"onnx": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter audio and fewer repeats (a few minutes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="outputs/benchmark")
    parser.add_argument("--sections", default="1,2,3,6",
                        help="which parts to run (4 comes with 1; 5 on request; 6 needs the onnx extra)")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="section 8's clock: thread = this thread's CPU time (use with --threads 1 on a loaded machine)")
    parser.add_argument("--step-gates", default="", metavar="KINDS",
                        help="section 3: gate kinds on top of the default ones, comma-separated (e.g. hidden_dim)")
    parser.add_argument("--preset", default=PRESET,
                        help=f"model of sections 1, 4 and 6 (default {PRESET}; hubert_base_tiny: a smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.seconds = 4.0 if args.quick else 10.0
    args.repeats = 3 if args.quick else 5
    args.lagrangian_steps = 150 if args.quick else 400
    args.step_seconds = 2.0 if args.quick else 4.0
    args.step_repeats = 2 if args.quick else 3
    args.step_rounds = 1 if args.quick else 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {args.threads} threads, {'quick' if args.quick else 'full'} mode")
    t0 = time.time()
    sections = set(args.sections.split(","))
    results: Dict = {"preset": args.preset}
    if "1" in sections or "2" in sections:
        inf = inference(args)
        models = inf.pop("models")
        results.update(inf if "1" in sections else {})
        if "2" in sections:
            results.update(target_kinds(args, models["unpruned"]))
    if "3" in sections:
        results.update(training_step(args))
    if "5" in sections:
        results.update(conv_widths(args))
    if "8" in sections:
        results.update(structures(args))
    if "6" in sections:
        results.update(onnx_runtime(args, pruned_models(args.preset)[0]))
    results["seconds_total"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if "inference" in results:
        plot(results, out / "speedup.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'speedup.png'} in {results['seconds_total']:.0f} s "
          f"(peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
