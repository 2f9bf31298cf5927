"""int8 vs float32 ONNX graphs of a model on real speech: hidden-state error and phone-probe PER.

    python scripts/onnx_int8.py                          # the demo teacher on the demo corpus
    python scripts/onnx_int8.py --model outputs/demo/export --steps 300

Both graphs come from `prune convert`'s exporter; features of every file of CORPUS/train.tsv and
valid.tsv are computed by onnxruntime (one utterance at a time, as the probe does in torch), then
the probe of prune/evaluate/probe.py is trained on each feature set with the same seeds.
Needs `pip install 'prune[onnx]'`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from importlib.resources import files
from pathlib import Path

import torch

from prune import load_pretrained
from prune.checkpoints.onnx_export import export_onnx, onnx_session, run_onnx, valid_frames_error
from prune.evaluate.probe import corpus_features, encoder_layers, fit_probe


def onnx_layers(path: Path):
    """wave (samples,) -> every hidden state from the ONNX graph, (layers, frames, dim)."""
    session = onnx_session(path, torch.get_num_threads())

    def featurize(wave: torch.Tensor) -> torch.Tensor:
        out = run_onnx(session, wave[None], torch.tensor([wave.shape[0]]))
        return torch.stack([v[0] for k, v in out.items() if k.startswith("hidden_")])
    return featurize


def layer_errors(actual, expected):
    """Per layer: the max over utterances of max|diff| / max|ref| (all frames are valid here)."""
    layers = expected[0][0].shape[0]
    return [max(valid_frames_error(a[k][None], e[k][None], torch.tensor([e.shape[1]]))
                for (a, _), (e, _) in zip(actual, expected)) for k in range(layers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(files("prune.demo_data") / "demo_teacher"))
    parser.add_argument("--corpus", default=str(files("prune.demo_data") / "demo_corpus"))
    parser.add_argument("--steps", type=int, default=1000, help="probe steps (the report's default: 1000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_pretrained(args.model)
    features = {}
    with tempfile.TemporaryDirectory() as tmp:
        features["torch"] = corpus_features(encoder_layers(model), Path(args.corpus))
        for kind in ("float32", "int8"):
            path = export_onnx(model, Path(tmp) / f"{kind}.onnx", quantize=None if kind == "float32" else kind)
            features[kind] = corpus_features(onnx_layers(path), Path(args.corpus))
    ref_train, ref_valid, vocab = features["torch"]
    print(f"{args.model} on {args.corpus}: {len(ref_train)} train / {len(ref_valid)} valid files")
    for kind in ("float32", "int8"):
        errors = layer_errors(features[kind][1], ref_valid)
        print(f"{kind:8s} vs torch, max relative error per hidden state (valid files): "
              + " ".join(f"{e:.1e}" for e in errors))
    for kind in ("torch", "float32", "int8"):
        train, valid, _ = features[kind]
        pers = [fit_probe(train, valid, vocab, args.steps, seed=s)["valid_per"] for s in args.seeds]
        spread = f" +- {statistics.stdev(pers):.3f}" if len(pers) > 1 else ""
        print(f"{kind:8s} features: probe valid PER {statistics.mean(pers):.3f}{spread} "
              f"(seeds {' '.join(map(str, args.seeds))}: {' '.join(f'{p:.3f}' for p in pers)}; {args.steps} steps)")


if __name__ == "__main__":
    main()
