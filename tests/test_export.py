import json
import os

import pytest
import torch
from helpers import load_with_torch_only, randomize_gates

import prune.checkpoints.export as export_module
from prune.checkpoints import ExportError, export_pruned, load_pruned, read_export_info
from prune.compile import compile_encoder
from prune.measured import num_params
from prune.models import build_preset
from prune.structures import GatedEncoder, count_macs


@pytest.fixture(scope="module")
def pruned():
    gated = randomize_gates(GatedEncoder(build_preset("wavlm_base_tiny"))).eval()
    return gated, compile_encoder(gated)


def test_round_trip_identical(tmp_path, pruned):
    gated, model = pruned
    out = export_pruned(model, tmp_path / "export", source=gated.config, metadata={"note": "test"})
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    loaded = load_pruned(out)
    assert not loaded.training
    x = torch.randn(2, 16000)
    lengths = torch.tensor([16000, 9000])
    with torch.no_grad():
        a, _ = model(x, lengths)
        b, _ = loaded(x, lengths)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    info = read_export_info(out)
    assert info["pruned"]["params"] == num_params(model)
    assert info["source"]["params"] == num_params(gated.model)
    assert info["pruned"]["macs_per_second"] == count_macs(model.config)
    assert info["pruned"]["heads"][1] is None  # layer 1's attention block was removed
    assert info["source"]["architecture"] == "wavlm" and info["metadata"] == {"note": "test"}


def test_export_has_the_permissions_of_any_new_folder(tmp_path, pruned):
    """Readable by whoever could read a folder the user made (not mkdtemp's private 0700/0600)."""
    out = export_pruned(pruned[1], tmp_path / "export")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file").write_text("x")
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(out) == mode(tmp_path / "plain")
    assert mode(out / "model.safetensors") == mode(out / "config.json") == mode(tmp_path / "plain" / "file")


def test_load_needs_only_torch_and_safetensors(tmp_path, pruned):
    out = export_pruned(pruned[1], tmp_path / "export")
    layers, params = load_with_torch_only(out).split()
    assert int(layers) == pruned[1].config.encoder_num_layers + 1
    assert int(params) == num_params(pruned[1])


def test_bad_paths(tmp_path, pruned):
    model = pruned[1]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export_pruned(model, tmp_path / "file")
    with pytest.raises(ExportError, match="is a file, not a folder"):
        export_pruned(model, tmp_path / "file" / "sub" / "export")
    nested = export_pruned(model, tmp_path / "new" / "nested" / "export")  # missing parents are made
    assert (nested / "model.safetensors").is_file()
    import shutil
    shutil.rmtree(tmp_path / "new")
    out = export_pruned(model, tmp_path / "export")
    with pytest.raises(ExportError, match="not empty"):
        export_pruned(model, out)
    export_pruned(model, out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["export", "file"]  # no temporary folders left
    with pytest.raises(ExportError, match="not an export folder"):
        load_pruned(tmp_path / "nowhere")


def test_failed_export_leaves_nothing_and_keeps_the_old_one(tmp_path, pruned, monkeypatch):
    model = pruned[1]
    out = export_pruned(model, tmp_path / "export")
    before = (out / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_pruned(model, out, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        export_pruned(model, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["export"]
    assert (out / "model.safetensors").read_bytes() == before


def test_truncated_weights(tmp_path, pruned):
    out = export_pruned(pruned[1], tmp_path / "export")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ExportError, match="truncated or damaged"):
        load_pruned(out)


def test_damaged_or_foreign_config(tmp_path, pruned):
    out = export_pruned(pruned[1], tmp_path / "export")
    config = out / "config.json"
    good = config.read_text()
    config.write_text(good[:40])
    with pytest.raises(ExportError, match="not valid JSON"):
        load_pruned(out)
    config.write_text(json.dumps({"model_type": "hubert"}))
    with pytest.raises(ExportError, match="not a prune export"):
        load_pruned(out)
    info = json.loads(good)
    info["config"]["encoder_nmu_heads"] = 3
    config.write_text(json.dumps(info))
    with pytest.raises(ExportError, match="encoder_nmu_heads"):
        load_pruned(out)


def test_config_that_does_not_match_the_weights(tmp_path, pruned):
    out = export_pruned(pruned[1], tmp_path / "export")
    info = json.loads((out / "config.json").read_text())
    info["config"]["extractor_conv_layer_config"][3][0] += 1
    (out / "config.json").write_text(json.dumps(info))
    with pytest.raises(ExportError, match=r"shape mismatches .*conv_layers\.3\.conv\.weight"):
        load_pruned(out)
    info["config"]["extractor_conv_layer_config"][3][0] -= 1
    info["config"]["encoder_attention_kept"][1] = True
    info["config"]["encoder_num_heads"][1] = 1
    info["config"]["encoder_head_index"][1] = [0]
    (out / "config.json").write_text(json.dumps(info))
    with pytest.raises(ExportError, match=r"missing keys .*layers\.1\.attention\.q_proj\.weight"):
        load_pruned(out)


# ------------------------------------------------------------------- the exporter seam (FORMATS)
def test_convert_to_prune_writes_an_export_folder(tmp_path, pruned, capsys):
    from prune.cli import main

    gated, model = pruned
    src = export_pruned(model, tmp_path / "src", source=gated.config)
    with pytest.raises(SystemExit) as done:
        main(["convert", str(src), str(tmp_path / "copy"), "--to", "prune"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'copy'} (model.safetensors + config.json, ")
    a, b = load_pruned(src).state_dict(), load_pruned(tmp_path / "copy").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # an option of another format, and an existing folder, are one line before any compute
    for out, args, message in [("new", ["--layers", "1"], "--layers is an option of --to onnx, not of --to prune"),
                               ("copy", [], "the folder is not empty (pass --overwrite to replace it)")]:
        with pytest.raises(SystemExit) as bad:
            main(["convert", str(src), str(tmp_path / out), "--to", "prune", *args])
        assert str(bad.value).startswith("prune convert: ") and message in str(bad.value), str(bad.value)
    assert not (tmp_path / "new").exists()


def test_preview_writes_through_the_formats_table(tmp_path, monkeypatch):
    """``prune.preview.preview`` (the library side of ``prune preview``) writes through
    FORMATS["prune"]: a format swapped in there is what it writes with."""
    from prune.checkpoints import convert
    from prune.preview import preview

    written = []
    native = convert.FORMATS[convert.NATIVE]

    def recording(model, out, options):
        written.append((out, sorted(options)))
        return native.write(model, out, options)

    monkeypatch.setitem(convert.FORMATS, convert.NATIVE, convert.Format(None, native.check, recording))
    result = preview("wavlm_base_tiny", 0.5, tmp_path / "preview", repeats=1, seconds=0.5)
    assert written == [(tmp_path / "preview", ["metadata", "overwrite", "source"])]
    assert abs(result.reached - 0.5) < 0.01 and result.error < 1e-5 and load_pruned(result.path)
    assert result.after["params"] < result.before["params"] and set(result.times) == {"unpruned", "pruned"}


def test_preview_checks_its_export_folder_before_any_compute(tmp_path, monkeypatch):
    import prune.preview as preview_module

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    monkeypatch.setattr(preview_module, "build_preset", lambda *a: pytest.fail("built before the check"))
    with pytest.raises(ExportError, match="not empty"):
        preview_module.preview("wavlm_base_tiny", 0.5, tmp_path / "out")
