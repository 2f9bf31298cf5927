"""``prune convert --to onnx``: the graph's contract, parity with torch through onnxruntime for every
family (pruned, with the hard cases, and unpruned), ``--layers``, ``--quantize int8``, and bad input.
Tests that export skip without the ``onnx`` extra; the command-line checks run without it."""

import json
from pathlib import Path
import subprocess
import sys

import pytest
import torch
from conftest import TINY
from helpers import randomize_gates

from prune import compile_encoder, export_pruned
from prune.checkpoints import onnx_export
from prune.checkpoints.onnx_export import check_batch, export_onnx, read_metadata, run_onnx, verify_onnx
from prune.cli import main
from prune.models import build_preset
from prune.structures import GatedEncoder

TOL = 1e-4  # the brief's bound: max |diff| / max |ref| per hidden state, valid frames


def _need_onnx():
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module)


def _pruned(name):
    """Three layers with the hard cases: layer 0 has no heads and no FFN block, layer 1 no attention
    block, layer 2 no FFN units (and pruned heads), every conv layer loses two channels."""
    return compile_encoder(randomize_gates(GatedEncoder(build_preset(name, encoder_num_layers=3))).eval())


def _graph(path):
    import onnx

    return onnx.load(str(path))


def _convert(capsys, *args):
    """Run ``prune convert ...`` -> (exit status, stdout + stderr)."""
    with pytest.raises(SystemExit) as exit_:
        main(["convert", *map(str, args)])
    out = capsys.readouterr()
    code = exit_.value.code
    return (code if isinstance(code, int) else 1), out.out + out.err + ("" if isinstance(code, int) else code)


# ----------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", TINY)
def test_pruned_graph_matches_torch_on_a_new_padded_batch(name, tmp_path):
    """Every family's pruned model: the checker passes, inputs/outputs are the contract's, and on a
    batch of 3 with lengths unlike the export's example (batch 2) every hidden state is within TOL."""
    _need_onnx()
    import onnx

    model = _pruned(name)
    cfg = model.config
    assert cfg.encoder_num_heads[0] == 0 and not cfg.encoder_attention_kept[1] and cfg.encoder_num_heads[2] > 0
    path = export_onnx(model, tmp_path / "m.onnx")
    graph = _graph(path)
    onnx.checker.check_model(graph, full_check=True)
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    assert [(i.name, i.type.tensor_type.elem_type) for i in graph.graph.input] == [("waveforms", f32),
                                                                                   ("lengths", i64)]
    n = cfg.encoder_num_layers
    assert [(o.name, o.type.tensor_type.elem_type) for o in graph.graph.output] == \
        [(f"hidden_{k}", f32) for k in range(n + 1)] + [("frames", i64)]
    waveforms, lengths = check_batch(cfg)
    assert waveforms.shape[0] != 2 and len(set(lengths.tolist())) == 3
    errors = verify_onnx(path, model, batch=(waveforms, lengths))
    assert list(errors) == [f"hidden_{k}" for k in range(n + 1)]
    assert max(errors.values()) < TOL, errors
    meta = read_metadata(path)
    assert json.loads(meta["layers"]) == list(range(n + 1))
    assert (meta["sample_rate"], meta["frame_rate"], meta["num_layers"]) == ("16000", "50", str(n))
    assert meta["architecture"] == cfg.architecture and meta["quantize"] == "none"


@pytest.mark.parametrize("fixture", ["wavlm_pruned", "prenorm_gated"])
def test_a_dphubert_file_exports_exactly(fixture, tmp_path):
    """DPHuBERT's files through the exporter: the last conv layer's output scale (its dummy_weight),
    WavLM's remaining heads of the position bias, gates folded at load time (tests/fixtures/dphubert,
    made by DPHuBERT's own code)."""
    _need_onnx()
    from prune import load_pretrained

    model = load_pretrained(Path(__file__).resolve().parent / "fixtures" / "dphubert" / f"{fixture}.pth")
    assert model.feature_extractor.output_scale is not None
    path = export_onnx(model, tmp_path / "m.onnx")
    errors = verify_onnx(path, model)
    assert max(errors.values()) < TOL, errors


def _params_reached(model, num_layers):
    """Parameters the first ``num_layers`` layers' last hidden state depends on (by backward)."""
    model.zero_grad(set_to_none=True)
    hiddens, _ = model(torch.randn(1, 8000), num_layers=num_layers)
    hiddens[-1].sum().backward()
    return sum(p.numel() for p in model.parameters() if p.grad is not None)


def test_layers_leave_the_layers_above_out_of_the_graph(tmp_path):
    """Unpruned pre-norm wav2vec2 Large (3 layers): --layers 1 outputs hidden_1 (the full model's:
    the first layer's output, no final LayerNorm) and frames only; the file holds the weights of
    that first layer and below, not those of the two above (noise on every weight keeps the
    exporter from merging equal initializers)."""
    _need_onnx()
    import numpy as np

    model = build_preset("wav2vec2_large_lv60k_tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = export_onnx(model, tmp_path / "m.onnx", layers=[1])
    stored = sum(int(np.prod(i.dims)) for i in _graph(path).graph.initializer)
    needed, layer = _params_reached(model, 1), sum(p.numel() for p in model.encoder.transformer.layers[1].parameters())
    assert needed <= stored < needed + 100 < needed + layer  # a few index constants besides the weights
    model.zero_grad(set_to_none=True)
    waveforms, lengths = check_batch(model.config)
    out = run_onnx(path, waveforms, lengths)
    assert list(out) == ["hidden_1", "frames"]
    with torch.no_grad():
        full, frames = model(waveforms, lengths)
    assert torch.equal(out["frames"], frames)
    assert onnx_export.valid_frames_error(out["hidden_1"], full[1], frames) < TOL
    assert json.loads(read_metadata(path)["layers"]) == [1]


# ------------------------------------------------------------------------------ the command
@pytest.fixture
def wavlm_export(tmp_path):
    """An unpruned pre-norm WavLM (3 layers; layer_norm extractor, normalised waveforms) as an export."""
    torch.manual_seed(3)
    return export_pruned(build_preset("wavlm_large_tiny").eval(), tmp_path / "export")


def test_convert_verifies_what_it_wrote(wavlm_export, tmp_path, capsys):
    _need_onnx()
    out = tmp_path / "sub" / "wavlm.onnx"
    code, text = _convert(capsys, wavlm_export, out, "--to", "onnx")
    assert code == 0, text
    line = next(t for t in text.splitlines() if t.startswith("onnxruntime vs torch"))
    errors = [float(x.split()[-1]) for x in line.split(": ", 1)[1].split(", ")]
    assert len(errors) == 4 and max(errors) < TOL
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["wavlm.onnx"]  # no temporary left


def test_convert_int8_quantizes_the_matmuls(tmp_path, capsys):
    _need_onnx()
    torch.manual_seed(4)
    folder = export_pruned(build_preset("hubert_base_tiny").eval(), tmp_path / "export")
    out = tmp_path / "int8.onnx"
    code, text = _convert(capsys, folder, out, "--to", "onnx", "--quantize", "int8", "--layers", "2")
    assert code == 0, text
    ops = {n.op_type for n in _graph(out).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    assert "hidden_2" in text and read_metadata(out)["quantize"] == "int8"
    error = float(text.split("hidden_2 ")[1].split()[0].rstrip(","))
    assert 0 < error < 0.5  # printed, not bounded: int8 is close, not exact
    print(f"int8, hubert_base_tiny, hidden_2: {error:.2e}")


def test_a_float_graph_beyond_the_tolerance_is_removed(tmp_path, capsys, monkeypatch):
    _need_onnx()
    folder = export_pruned(build_preset("hubert_base_tiny").eval(), tmp_path / "export")
    monkeypatch.setattr(onnx_export, "FLOAT_TOLERANCE", -1.0)  # any error is too much
    out = tmp_path / "m.onnx"
    code, text = _convert(capsys, folder, out, "--to", "onnx", "--layers", "0")
    assert code == 1 and "above -1 for a float32 graph" in text and f"{out} removed" in text
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["export"]


# ------------------------------------------------------------------------------ bad input
@pytest.fixture
def no_export(monkeypatch):
    """Fail the test if anything reaches the export."""
    def refuse(*args, **kwargs):
        raise AssertionError("export started despite bad input")
    monkeypatch.setattr(onnx_export, "export_onnx", refuse)


@pytest.mark.parametrize("case", ["to", "suffix", "folder", "model", "unreadable"])
def test_bad_input_is_one_line_before_any_compute(case, wavlm_export, tmp_path, capsys, no_export):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    args = {"to": (wavlm_export, tmp_path / "m.onnx", "--to", "tflite"),
            "suffix": (wavlm_export, tmp_path / "m.pt", "--to", "onnx"),
            "folder": (wavlm_export, blocker / "m.onnx", "--to", "onnx"),
            "model": (tmp_path / "missing", tmp_path / "m.onnx", "--to", "onnx"),
            "unreadable": (garbage, tmp_path / "m.onnx", "--to", "onnx")}[case]
    if case == "unreadable":
        _need_onnx()  # the file is read after the extra is checked
    code, text = _convert(capsys, *args)
    expected = {"to": "--to tflite: unknown format; choose from hf, onnx, prune", "suffix": "must end in .onnx",
                "folder": "not a writable folder", "model": "missing does not exist",
                "unreadable": "garbage.pt"}[case]
    assert code == 1 and expected in text and len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "m.onnx").exists()


def test_layers_out_of_range_name_the_layer_count(wavlm_export, tmp_path, capsys, no_export):
    _need_onnx()
    code, text = _convert(capsys, wavlm_export, tmp_path / "m.onnx", "--to", "onnx", "--layers", "1", "4")
    assert code == 1 and "--layers 4: the model has 3 transformer layers; choose from 0" in text, text


def test_existing_out_needs_overwrite(wavlm_export, tmp_path, capsys, no_export):
    out = tmp_path / "m.onnx"
    out.write_text("old")
    code, text = _convert(capsys, wavlm_export, out, "--to", "onnx")
    assert code == 1 and "pass --overwrite" in text and out.read_text() == "old"


def test_missing_extra_says_how_to_install(wavlm_export, tmp_path, capsys, monkeypatch, no_export):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # its import now fails
    code, text = _convert(capsys, wavlm_export, tmp_path / "m.onnx", "--to", "onnx")
    assert code == 1 and "pip install 'prune[onnx]'" in text and len(text.strip().splitlines()) == 1, text


def test_import_prune_does_not_import_onnx():
    code = ("import sys, prune, prune.cli, prune.checkpoints.convert, prune.checkpoints.onnx_export\n"
            "print([m for m in ('onnx', 'onnxscript', 'onnxruntime') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["hubert_base_tiny", "wavlm_large_tiny"])
def test_a_cut_hidden_dimension_exports_and_matches(name, tmp_path):
    """A compiled model with a pruned hidden dimension (PhantomLayerNorms over D, the groupwise
    positional conv; WavLM's gate chunks gathered by the kept channel ids) through onnxruntime."""
    _need_onnx()
    from prune.structures import GateConfig

    gated = randomize_gates(GatedEncoder(build_preset(name, encoder_num_layers=3), GateConfig(hidden_dim=True)))
    model = compile_encoder(gated.eval())
    assert model.config.encoder_embed_dim < model.config.hidden_total
    path = export_onnx(model, tmp_path / "m.onnx")
    errors = verify_onnx(path, model, batch=check_batch(model.config))
    assert max(errors.values()) < TOL, errors
