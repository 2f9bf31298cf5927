"""Build the DPHuBERT-format test fixtures with DPHuBERT's own code (pyf98/DPHuBERT).

    python scripts/make_dphubert_fixtures.py --dphubert /tmp/dphubert --out tests/fixtures/dphubert

Run it in its own interpreter: it imports DPHuBERT's ``wav2vec2`` package and its top-level
``prune.py`` (under another module name, since that file shadows our package) and never imports
prune. Every file is made the way DPHuBERT's scripts make it, so the fixtures follow DPHuBERT's
layout, not prune's key map:

* ``hubert_teacher.pth``: a converted teacher (convert_*.py): ``{"state_dict", "config"}``, no gates;
* ``*_gated.pth``: the same layout with the five ``*_prune_*`` flags on and the HardConcrete
  ``log_alpha`` in the state dict (a model mid-pruning, saved as ``model.state_dict()``);
* ``*_pruned.pth``: ``prune.py``'s ``prune_from_ckpt`` run on a Lightning-style distillation
  checkpoint (``student_model.*`` / ``distill_linear_projs.*``) of the gated model, saved as
  prune.py saves it (``{"state_dict", "config", "distill_linear_projs"}``).

Three families: HuBERT-style post-norm (group_norm extractor), WavLM (post-norm, relative position
bias, kept-head indices), pre-norm wav2vec 2.0 Large-style (layer_norm extractor with conv bias,
normalised waveforms). The gates are drawn so that heads, FFN units and conv channels are pruned,
one layer loses its whole attention and another its whole FFN. ``NAME.ref.pt`` holds DPHuBERT's
outputs on a padded batch: ``extract_features`` (the projected features, before the positional
conv, then every layer's output), ``forward``'s output (a pre-norm model's final LayerNorm
included) and the valid frames.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch

LAYERS = 3
EMBED, HEADS, FFN = 16, 4, 24
CONV = [(8, 10, 5)] + [(8, 3, 2)] * 4 + [(8, 2, 2)] * 2
SAMPLES = (3200, 2300)  # two utterances; the second is padded
NO_ATTENTION_LAYER, NO_FFN_LAYER = 1, 2  # WavLM keeps layer 0's attention: it owns the bias table
TEACHERS = ("hubert",)  # families whose converted teacher is kept as a fixture
FLAGS = ("extractor_prune_conv_channels", "encoder_prune_attention_heads", "encoder_prune_attention_layer",
         "encoder_prune_feed_forward_intermediate", "encoder_prune_feed_forward_layer")


def base_config(family: str) -> Dict[str, Any]:
    """The teacher's ``wav2vec2_model`` / ``wavlm_model`` arguments, as convert_*.py writes them."""
    prenorm = family == "prenorm"
    config: Dict[str, Any] = dict(
        extractor_mode="layer_norm" if prenorm else "group_norm", extractor_conv_layer_config=list(CONV),
        extractor_conv_bias=prenorm, encoder_embed_dim=EMBED, encoder_projection_dropout=0.1,
        encoder_pos_conv_kernel=8, encoder_pos_conv_groups=2, encoder_num_layers=LAYERS,
        encoder_use_attention=[True] * LAYERS, encoder_use_feed_forward=[True] * LAYERS,
        encoder_attention_dropout=0.1, encoder_ff_interm_features=[FFN] * LAYERS, encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.1, encoder_layer_norm_first=prenorm, encoder_layer_drop=0.05, aux_num_out=None,
        normalize_waveform=prenorm, **{flag: False for flag in FLAGS})
    if family == "wavlm":
        config.update(encoder_total_num_heads=[HEADS] * LAYERS,
                      encoder_remaining_heads=[list(range(HEADS)) for _ in range(LAYERS)],
                      encoder_num_buckets=16, encoder_max_distance=32)
    else:
        config.update(encoder_num_heads=[HEADS] * LAYERS, encoder_head_dim=EMBED // HEADS)
    return config


def randomize_weights(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every float tensor but the gates and the extractor's dummy weight gets random values, so
    that a LayerNorm, bias or gate constant loaded into the wrong place changes the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "log_alpha" in name or name.endswith("dummy_weight"):
                continue
            if name.endswith("weight_g") or "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))


def randomize_gates(model: torch.nn.Module, generator: torch.Generator) -> None:
    """log_alpha spread wide enough that the eval masks close some heads, units and channels and
    leave the survivors at soft values; one layer's attention and another's FFN closed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("log_alpha"):
                p.copy_(1.0 + 2.5 * torch.randn(p.shape, generator=generator))
        layers = model.encoder.transformer.layers
        for i, layer in enumerate(layers):
            layer.attention.hard_concrete_for_layer.log_alpha.fill_(-8.0 if i == NO_ATTENTION_LAYER else 4.0)
            layer.feed_forward.hard_concrete_for_layer.log_alpha.fill_(-8.0 if i == NO_FFN_LAYER else 1.5)


def batch(generator: torch.Generator):
    """waveforms (2, samples) with a padded second row (small noise in the padding), lengths (2,)."""
    x = 0.1 * torch.randn(len(SAMPLES), max(SAMPLES), generator=generator)
    lengths = torch.tensor(SAMPLES)
    x[1, SAMPLES[1]:] *= 0.01
    return x, lengths


def reference(model: torch.nn.Module, generator: torch.Generator) -> Dict[str, Any]:
    model.eval()
    x, lengths = batch(generator)
    with torch.no_grad():
        hiddens, frames = model.extract_features(x, lengths)
        final, _ = model(x, lengths)
    return {"waveforms": x, "lengths": lengths, "hiddens": [h.clone() for h in hiddens], "final": final.clone(),
            "frames": frames}


def build(family: str, dphubert: Any, out: Path, seed: int) -> None:
    model_lib, prune_lib = dphubert
    generator = torch.Generator().manual_seed(seed)
    config = base_config(family)
    teacher = model_lib.wav2vec2_model(**config)
    randomize_weights(teacher, generator)
    teacher_file = out / f"{family}_teacher.pth"
    torch.save({"state_dict": teacher.state_dict(), "config": config}, teacher_file)
    if family in TEACHERS:
        torch.save(reference(teacher, generator), out / f"{family}_teacher.ref.pt")

    gated_config = {**config, **{flag: True for flag in FLAGS}}
    gated = model_lib.wav2vec2_model(**gated_config)
    missing, unexpected = gated.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("log_alpha") for k in missing), (missing, unexpected)
    randomize_gates(gated, generator)
    torch.save({"state_dict": gated.state_dict(), "config": gated_config}, out / f"{family}_gated.pth")
    torch.save(reference(gated, generator), out / f"{family}_gated.ref.pt")

    with tempfile.TemporaryDirectory() as tmp:  # what distill.py's Lightning checkpoint holds
        distilled = Path(tmp) / "distilled.ckpt"
        projs = torch.nn.Linear(EMBED, EMBED)
        state = {f"student_model.{k}": v for k, v in gated.state_dict().items()}
        state.update({f"distill_linear_projs.0.{k}": v for k, v in projs.state_dict().items()})
        torch.save({"state_dict": state}, distilled)
        pruned = prune_lib.prune_from_ckpt(distilled_ckpt=distilled, original_ckpt=teacher_file)
    pruned_file = out / f"{family}_pruned.pth"
    torch.save(pruned, pruned_file)
    torch.save(reference(prune_lib.load_pruned_model(pruned_file), generator), out / f"{family}_pruned.ref.pt")
    if family not in TEACHERS:  # only prune.py's input here; one teacher file is enough (fixtures stay small)
        teacher_file.unlink()


def import_dphubert(checkout: Path):
    """DPHuBERT's wav2vec2.model and its prune.py (as module ``dphubert_prune``)."""
    if not (checkout / "wav2vec2" / "model.py").is_file() or not (checkout / "prune.py").is_file():
        raise SystemExit(f"--dphubert {checkout}: not a DPHuBERT checkout (no wav2vec2/model.py or prune.py)")
    sys.path.insert(0, str(checkout))
    from wav2vec2 import model as model_lib  # noqa: E402 (DPHuBERT's package)
    spec = importlib.util.spec_from_file_location("dphubert_prune", checkout / "prune.py")
    prune_lib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prune_lib)
    return model_lib, prune_lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dphubert", type=Path, required=True, help="a checkout of pyf98/DPHuBERT")
    parser.add_argument("--out", type=Path, required=True, help="folder for the fixture files")
    args = parser.parse_args()
    dphubert = import_dphubert(args.dphubert.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    for seed, family in enumerate(("hubert", "wavlm", "prenorm")):
        build(family, dphubert, args.out, seed)
    total = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {len(list(args.out.iterdir()))} files, {total / 1024:.0f} KiB, to {args.out}")


if __name__ == "__main__":
    main()
