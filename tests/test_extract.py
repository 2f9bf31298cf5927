"""``prune extract``: hidden states for a folder of audio, one .npy per file."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

import prune.extract as ex
from helpers import randomize_gates
from prune import GatedEncoder, build_preset, compile_encoder, export_pruned
from prune.cli import main
from prune.extract import ExtractError, extract_features
from prune.data.audio import load_audio

# (relative path, seconds, sample rate, channels): sub-folders, another rate, stereo
FILES = [("a/one.wav", 0.9, 16000, 1), ("a/two.flac", 0.35, 16000, 1), ("b/c/three.wav", 0.6, 8000, 1),
         ("four.wav", 1.2, 16000, 2), ("five.flac", 0.5, 16000, 1), ("six.wav", 0.27, 16000, 1)]


def make_corpus(root: Path, bad: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for rel, seconds, rate, channels in FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, 0.3 * rng.standard_normal((int(seconds * rate), channels)).astype(np.float32), rate)
    if bad:
        (root / "broken.wav").write_bytes(b"RIFF not really audio")
        sf.write(root / "short.wav", np.zeros(100, np.float32), 16000)  # below the receptive field
    return root


def export(model: nn.Module, folder: Path) -> Path:
    return export_pruned(model.eval(), folder)


def pruned_wavlm() -> nn.Module:
    return compile_encoder(randomize_gates(GatedEncoder(build_preset("wavlm_base_tiny"))).eval())


# group-norm front end + post-norm; LayerNorm front end + pre-norm + waveform normalisation; pruned WavLM
MODELS = {"hubert_base_tiny": lambda: build_preset("hubert_base_tiny"),
          "wav2vec2_large_lv60k_tiny": lambda: build_preset("wav2vec2_large_lv60k_tiny"),
          "pruned_wavlm_base_tiny": pruned_wavlm}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def spy(monkeypatch):
    """The batch sizes each forward of a run was given."""
    sizes = []
    real = ex.torch_forward

    def torch_forward(model, layers):
        forward = real(model, layers)

        def counted(waves):
            sizes.append(len(waves))
            return forward(waves)
        return counted

    monkeypatch.setattr(ex, "torch_forward", torch_forward)
    return sizes


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def alone(model: nn.Module, path: Path, layer: int) -> np.ndarray:
    """The model's own forward on one file, unpadded: (frames, dim)."""
    with torch.no_grad():
        hiddens, _ = model(load_audio(path)[None])
    return hiddens[layer][0].numpy()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batched_features_are_each_files_own_forward(name, corpus, tmp_path, spy):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    path = export(model, tmp_path / "model")
    n = model.config.encoder_num_layers
    layers = [0, 1, n]
    batched = extract_features(path, corpus, layers, tmp_path / "batched", progress=False)
    assert spy == [6] and batched.written == 6  # one batch of all six
    single = extract_features(path, corpus, layers, tmp_path / "single", max_batch_seconds=0.1, progress=False)
    assert spy[1:] == [1] * 6
    for rel, *_ in FILES:
        npy = Path(rel).with_suffix(".npy")
        for k in layers:
            ours = np.load(tmp_path / "batched" / f"layer_{k}" / npy)
            assert ours.dtype == np.float32
            expected = alone(model, corpus / rel, k)
            assert ours.shape == expected.shape  # trimmed to the file's own frames
            assert rel_err(ours, np.load(tmp_path / "single" / f"layer_{k}" / npy)) < 1e-5
            assert rel_err(ours, expected) < 1e-5, (rel, k)
    assert single.written == 6


def test_a_padded_batch_is_not_exact_for_a_groupnorm_front_end(corpus):
    """Why the GroupNorm models run their conv front end one file at a time: in a padded batch the
    GroupNorm's statistics include the padding, and a short file's features change."""
    model = build_preset("hubert_base_tiny").eval()
    long, short = load_audio(corpus / "four.wav"), load_audio(corpus / "six.wav")
    x = torch.zeros(2, long.numel())
    x[0], x[1, :short.numel()] = long, short
    with torch.no_grad():
        hiddens, frames = model(x, torch.tensor([long.numel(), short.numel()]))
    padded = hiddens[1][1, :int(frames[1])].numpy()
    assert rel_err(padded, alone(model, corpus / "six.wav", 1)) > 1e-3
    assert ex.padding_is_exact(build_preset("hubert_large_tiny").config)
    assert not ex.padding_is_exact(model.config)


def test_num_layers_runs_only_the_layers_needed():
    model = build_preset("wav2vec2_large_lv60k_tiny").eval()  # pre-norm: the final LayerNorm is the last layer's
    calls = []
    model.encoder.transformer.layers[2].register_forward_hook(lambda *_: calls.append(1))
    x, lengths = torch.randn(2, 6000), torch.tensor([6000, 4000])
    with torch.no_grad():
        full, frames = model(x, lengths)
        calls.clear()
        part, part_frames = model(x, lengths, num_layers=2)
        assert not calls and len(part) == 3 and torch.equal(part_frames, frames)
        for a, b in zip(part, full):
            assert torch.equal(a, b)
        assert torch.equal(model(x, lengths, num_layers=3)[0][3], full[3])
        with pytest.raises(ValueError, match=r"num_layers=4 is outside \[0, 3\]"):
            model(x, lengths, num_layers=4)


def test_layout_dtype_record_and_skipped_files(corpus, tmp_path, caplog):
    model = build_preset("hubert_base_tiny").eval()
    path = export(model, tmp_path / "model")
    out = tmp_path / "features"
    with caplog.at_level("INFO"):
        done = extract_features(path, corpus, [2], out, float16=True, progress=False)
    for rel, *_ in FILES:  # one layer: the input's layout directly under out
        array = np.load(out / Path(rel).with_suffix(".npy"))
        assert array.dtype == np.float16 and array.shape == alone(model, corpus / rel, 2).shape
        assert rel_err(array, alone(model, corpus / rel, 2)) < 1e-2
    assert not list(out.rglob("*.tmp")) and not (out / "layer_2").exists()
    record = json.loads((out / "extract.json").read_text())
    assert record["layers"] == [2] and record["dtype"] == "float16" and record["frame_rate"] == 50.0
    assert record["model"] == str(path.resolve()) and record["runtime"] == "torch" and record["complete"]
    assert record["counts"] == {"files": 8, "written": 6, "present": 0, "skipped": 2}
    assert set(record["skipped"]) == {str(corpus / "broken.wav"), str(corpus / "short.wav")}
    assert "fewer than min_samples" in record["skipped"][str(corpus / "short.wav")]
    assert done.skipped == record["skipped"]
    assert "extract: 6/6 files (100%)" in caplog.text  # off a terminal: log lines, not a bar


def test_a_file_that_fails_to_decode_is_skipped_and_listed(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", bad=False)
    # a valid header and a truncated body: passes the header check, fails when decoded
    data = (corpus / "five.flac").read_bytes()
    (corpus / "five.flac").write_bytes(data[:len(data) // 3])
    path = export(build_preset("hubert_base_tiny"), tmp_path / "model")
    done = extract_features(path, corpus, [1], tmp_path / "out", progress=False)
    assert done.written == 5 and list(done.skipped) == [str(corpus / "five.flac")]
    assert "cannot decode" in done.skipped[str(corpus / "five.flac")]
    assert json.loads((tmp_path / "out" / "extract.json").read_text())["skipped"] == done.skipped


def test_resume_computes_only_what_is_missing_and_refuses_other_settings(corpus, tmp_path, spy):
    path = export(build_preset("hubert_base_tiny"), tmp_path / "model")
    out = tmp_path / "out"
    extract_features(path, corpus, [1, 2], out, progress=False)
    target = out / "layer_2" / "a" / "two.npy"
    before = np.load(target)
    target.unlink()
    spy.clear()
    again = extract_features(path, corpus, [1, 2], out, progress=False)
    assert spy == [1] and again.written == 1 and again.present == 5  # only that file
    assert rel_err(np.load(target), before) < 1e-5  # computed alone now, in a batch before
    spy.clear()
    other = export(build_preset("hubert_base_tiny", encoder_num_layers=3), tmp_path / "other")
    assert extract_features(path, corpus, [2, 1], out, progress=False).present == 6  # the same set of layers
    for kwargs, what in [(dict(model=path, layers=[2]), "layers [1, 2] there, [2] here"),
                         (dict(model=path, layers=[1, 2], float16=True), "dtype float32 there, float16 here"),
                         (dict(model=other, layers=[1, 2]), "model ")]:
        with pytest.raises(ExtractError, match="holds features of other settings") as e:
            extract_features(audio=corpus, out=out, progress=False, **kwargs)
        assert what in str(e.value) and "\n" not in str(e.value)
    assert spy == []


def test_a_killed_write_leaves_no_partial_file(corpus, tmp_path, monkeypatch):
    path = export(build_preset("hubert_base_tiny"), tmp_path / "model")
    real_save = np.save

    def dies_midway(f, array):
        real_save(f, array[: len(array) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        extract_features(path, corpus, [1], tmp_path / "out", progress=False)
    assert [p.name for p in (tmp_path / "out").rglob("*")] == ["extract.json"]
    assert not json.loads((tmp_path / "out" / "extract.json").read_text())["complete"]


def test_a_terminal_gets_a_progress_bar(corpus, tmp_path, monkeypatch):
    class Terminal:
        text = ""

        def write(self, s):
            Terminal.text += s

        def flush(self):
            pass

        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    path = export(build_preset("hubert_base_tiny"), tmp_path / "model")
    extract_features(path, corpus, [1], tmp_path / "out")
    assert "extract" in Terminal.text and "6/6" in Terminal.text and "\r" in Terminal.text


def test_a_manifest_keeps_its_layout(corpus, tmp_path):
    from prune.data.manifest import write_manifest

    write_manifest(tmp_path / "list.tsv", str(corpus), [("a/one.wav", 14400), ("b/c/three.wav", 9600)])
    path = export(build_preset("hubert_base_tiny"), tmp_path / "model")
    done = extract_features(path, tmp_path / "list.tsv", [1], tmp_path / "out", progress=False)
    assert done.written == 2
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.npy")) == \
        ["a/one.npy", "b/c/three.npy"]
    write_manifest(tmp_path / "escape.tsv", str(corpus / "a"), [("../four.wav", 19200)])
    with pytest.raises(ExtractError, match="is outside the root"):
        extract_features(path, tmp_path / "escape.tsv", [1], tmp_path / "out2", progress=False)


# ------------------------------------------------------------------------------ bad input
def run_cli(args, capsys):
    """(exit code: 0 or the one-line message, stderr)"""
    with pytest.raises(SystemExit) as e:
        main(["extract", *map(str, args)])
    return e.value.code, capsys.readouterr().err.strip()


def test_bad_input_is_one_line_before_any_compute(corpus, tmp_path, capsys, spy, monkeypatch):
    path = export(build_preset("hubert_base_tiny"), tmp_path / "model")
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("no audio here")
    (tmp_path / "a_file").write_text("")
    cases = [
        ([tmp_path / "nope", corpus, "--layer", 1], "does not exist"),
        ([tmp_path / "a_file", corpus, "--layer", 1], "a_file"),
        ([path, tmp_path / "missing", "--layer", 1], "no such folder or manifest"),
        ([path, tmp_path / "empty", "--layer", 1], "no readable audio file"),
        ([path, tmp_path / "text", "--layer", 1], "no readable audio file"),
        ([path, corpus, "--layer", 3], "--layer 3: " + str(path) + " has 2 transformer layers; choose from 0"),
        ([path, corpus, "--layer", -1], "--layer -1: "),
        ([path, corpus, "--layer", 1, "--max-batch-seconds", 0], "--max-batch-seconds must be positive"),
    ]
    for args, message in cases:
        code, _ = run_cli([*args, "--out", tmp_path / "out"], capsys)
        assert code.startswith("prune extract: ") and message in code and "\n" not in code, (args, code)
    code, _ = run_cli([path, corpus, "--layer", 1, "--out", tmp_path / "a_file"], capsys)
    assert "--out" in code and "not a folder" in code
    code, _ = run_cli([path, corpus, "--layer", 1, "--out", "/proc/prune-extract"], capsys)
    assert "cannot write in /proc" in code and "give a writable folder" in code
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, _ = run_cli([path, corpus, "--layer", 1, "--out", tmp_path / "out", "--onnx", tmp_path / "m.onnx"], capsys)
    assert "pip install 'prune[onnx]'" in code
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "mine.txt").write_text("someone else's")
    code, _ = run_cli([path, corpus, "--layer", 1, "--out", tmp_path / "foreign"], capsys)
    assert "not a prune extract folder" in code
    assert spy == [] and not (tmp_path / "out").exists()


def test_float16_refuses_values_it_cannot_hold():
    assert ex.to_dtype(np.array([[1.5, -65504.0]], np.float32), np.float16, "x.npy").dtype == np.float16
    with pytest.raises(ExtractError, match="x.npy: values up to 7e\\+04 do not fit in float16"):
        ex.to_dtype(np.array([[1.0, 7e4]], np.float32), np.float16, "x.npy")


def test_ctrl_c_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "extract_features", interrupted)
    code, err = run_cli(["m", "a", "--layer", 1, "--out", tmp_path], capsys)
    assert code == 130 and "run the same command again to go on" in err


def test_the_command_line_prints_a_summary(corpus, tmp_path, capsys):
    path = export(build_preset("hubert_base_tiny"), tmp_path / "model")
    code, err = run_cli([path, corpus, "--layer", 2, "--out", tmp_path / "out", "--threads", 1], capsys)
    assert code == 0
    assert "skipped 2 of 8 files" in err and "broken.wav" in err
    assert np.load(tmp_path / "out" / "four.npy").shape[1] == 32


# ------------------------------------------------------------------------------------ ONNX
class Contract(nn.Module):
    """``prune convert --to onnx``'s graph contract around a model: (waveforms, lengths) ->
    hidden_K for ``layers``, then frames."""

    def __init__(self, model: nn.Module, layers):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, waveforms, lengths):
        hiddens, frames = self.model(waveforms, lengths)
        return (*[hiddens[k] for k in self.layers], frames)


def export_graph(model: nn.Module, path: Path, layers) -> Path:
    try:  # the project's exporter, once it is there
        from prune.checkpoints.onnx_export import export_onnx
    except ImportError:
        export_onnx = None
    if export_onnx is not None:
        export_onnx(model, path, layers=layers)
        return path
    x, lengths = torch.randn(2, 8000), torch.tensor([8000, 6000])
    batch, samples = torch.export.Dim("batch"), torch.export.Dim("samples", min=800)
    torch.onnx.export(Contract(model, layers).eval(), (x, lengths), str(path), dynamo=True,
                      input_names=["waveforms", "lengths"],
                      output_names=[f"hidden_{k}" for k in layers] + ["frames"],
                      dynamic_shapes={"waveforms": {0: batch, 1: samples}, "lengths": {0: batch}})
    return path


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    folder = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = build_preset("wav2vec2_large_lv60k_tiny").eval()
    return export(model, folder / "model"), export_graph(model, folder / "model.onnx", [1, 3]), model


def test_onnx_features_match_torch_features(onnx_model, corpus, tmp_path):
    path, graph, _ = onnx_model
    torch_run = extract_features(path, corpus, [1, 3], tmp_path / "torch", progress=False)
    onnx_run = extract_features(path, corpus, [1, 3], tmp_path / "onnx", onnx=graph, threads=1, progress=False)
    assert onnx_run.written == torch_run.written == 6
    worst = 0.0
    for rel, *_ in FILES:
        for k in (1, 3):
            npy = Path(f"layer_{k}") / Path(rel).with_suffix(".npy")
            a, b = np.load(tmp_path / "onnx" / npy), np.load(tmp_path / "torch" / npy)
            assert a.shape == b.shape
            worst = max(worst, rel_err(a, b))
    assert worst < 1e-4
    record = json.loads((tmp_path / "onnx" / "extract.json").read_text())
    assert record["runtime"] == "onnxruntime" and record["onnx"] == str(graph.resolve())


def test_onnx_graph_must_hold_the_layers(onnx_model, corpus, tmp_path):
    path, graph, _ = onnx_model
    with pytest.raises(ExtractError, match=r"--layer 2: .* has no output hidden_2, only hidden_1, hidden_3"):
        extract_features(path, corpus, [2], tmp_path / "out", onnx=graph, progress=False)
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(ExtractError, match="onnxruntime cannot load it"):
        extract_features(path, corpus, [1], tmp_path / "out", onnx=tmp_path / "junk.onnx", progress=False)
    assert not (tmp_path / "out").exists()


class FakeSession:
    """A stand-in for an onnxruntime session that follows the graph contract with a torch model
    (to test the batching rule without exporting a second graph); records the batch sizes."""

    class Port:
        def __init__(self, name, shape=None):
            self.name, self.shape = name, shape

    def __init__(self, model):
        self.model, self.sizes = model, []

    def get_inputs(self):
        return [self.Port("waveforms"), self.Port("lengths")]

    def get_outputs(self):
        n = self.model.config.encoder_num_layers
        return [self.Port(f"hidden_{k}", ["batch", "frames", 32]) for k in range(n + 1)] + [self.Port("frames")]

    def run(self, names, feeds):
        self.sizes.append(len(feeds["lengths"]))
        with torch.no_grad():
            hiddens, frames = self.model(torch.from_numpy(feeds["waveforms"]), torch.from_numpy(feeds["lengths"]))
        return [hiddens[int(n[7:])].numpy() for n in names[:-1]] + [frames.numpy()]


def test_onnx_with_a_groupnorm_front_end_runs_one_file_at_a_time(corpus, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    model = build_preset("hubert_base_tiny").eval()
    path = export(model, tmp_path / "model")
    session = FakeSession(model)
    monkeypatch.setattr(ex, "onnx_session", lambda *_: session)
    (tmp_path / "model.onnx").write_bytes(b"the graph")  # its sha256 is the model's identity in extract.json
    extract_features(path, corpus, [2], tmp_path / "out", onnx=tmp_path / "model.onnx", progress=False)
    assert session.sizes == [1] * 6
    for rel, *_ in FILES:
        assert rel_err(np.load(tmp_path / "out" / Path(rel).with_suffix(".npy")), alone(model, corpus / rel, 2)) < 1e-5
