"""scripts/compare_dphubert.py: DPHuBERT's own code next to prune's.

The tests that run DPHuBERT's code need a checkout of pyf98/DPHuBERT, named by the environment
variable DPHUBERT_CHECKOUT; without it they skip. The others need nothing."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers_train import DEMO_CORPUS, demo_corpus_split

from prune.data.dataset import Batch
from prune.models import build_preset

REPO = Path(__file__).resolve().parents[1]
CHECKOUT = os.environ.get("DPHUBERT_CHECKOUT")
# DPHuBERT's positional conv uses torch's old weight_norm API, which warns
pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.nn\.utils\.weight_norm.* is deprecated:FutureWarning")
needs_checkout = pytest.mark.skipif(not CHECKOUT, reason="set DPHUBERT_CHECKOUT to a checkout of pyf98/DPHuBERT")


def load_script():
    spec = importlib.util.spec_from_file_location("compare_dphubert", REPO / "scripts" / "compare_dphubert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cd = load_script()


@pytest.fixture(scope="module")
def dp():
    return cd.load_dphubert(Path(CHECKOUT))


def padded_batch():
    lengths = torch.tensor([9000, 7000, 4000])
    waves = torch.randn(3, 9000) * 0.1
    waves[torch.arange(9000)[None, :] >= lengths[:, None]] = 0.0
    return waves, lengths


# ------------------------------------------------------------------------- no checkout needed
def test_summary_averages_each_runs_mean_over_probe_seeds():
    rows = [{"run": "a", "method": "m", "params": 100, "probe_valid_per": {"0": 0.1, "1": 0.3, "2": 9.9}},
            {"run": "b", "method": "m", "params": 200, "probe_valid_per": {"0": 0.3, "1": 0.5}},
            {"run": "t", "method": "t", "params": 7, "probe_valid_per": {"0": 0.2, "1": 0.2}}]
    assert cd.run_stats(rows[0]["probe_valid_per"], [0, 1]) == pytest.approx((0.2, 0.1414213))
    m, t = cd.summarize(rows, [0, 1])
    assert m["runs"] == 2 and m["params"] == 150
    assert m["per_mean"] == pytest.approx(0.3) and m["per_std"] == pytest.approx(0.1414213)
    assert (m["per_min"], m["per_max"]) == pytest.approx((0.2, 0.4))
    assert t["runs"] == 1 and t["per_std"] is None
    text = cd.markdown(rows[:2], [m], [0, 1], ["# title"])
    assert "| a | 100 | 0.100 | 0.300 | 0.200 | 0.141 |" in text and "| m | 2 | 150 | 0.300 | 0.141 |" in text


def test_overrides_may_follow_multi_valued_options():
    args = cd.parse_args(["--dphubert", "x", "--seeds", "0", "1", "trainer.prune_steps=20", "--probe-seeds", "3",
                          "probe.steps=30"])
    assert args.seeds == [0, 1] and args.probe_seeds == [3]
    assert args.overrides == ["trainer.prune_steps=20", "probe.steps=30"]


def test_final_stage_budget_follows_the_recipe_else_half_the_lr():
    assert cd.final_budget(cd.compose_checked("demo_dphubert", [])) == (2.5e-4, 50, 500)  # optim.final_*
    assert cd.final_budget(cd.compose_checked("demo", [])) == (2.5e-4, 50, 500)  # null: lr / 2, warmup_steps
    assert cd.final_budget(cd.compose_checked("demo", ["optim.final_lr=1e-3", "optim.final_warmup_steps=7"]))[:2] \
        == (1e-3, 7)


def test_a_scheduler_that_passes_verbose_runs_under_this_torch():
    class PassesVerbose(torch.optim.lr_scheduler._LRScheduler):  # what DPHuBERT's LinearDecayLRScheduler does
        def __init__(self, optimizer, last_epoch=-1, verbose=False):
            super().__init__(optimizer, last_epoch=last_epoch, verbose=verbose)

        def get_lr(self):
            return [base / self._step_count for base in self.base_lrs]

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = cd._tolerant_scheduler(PassesVerbose)(opt)
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # its own get_lr, at its second step


def test_a_folder_that_is_no_checkout_is_one_line_before_any_compute(tmp_path, capsys):
    out = tmp_path / "out"
    assert cd.main(["--dphubert", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dphubert:" in err and "not a checkout of pyf98/DPHuBERT" in err
    assert not out.exists()


def test_a_target_dphubert_cannot_run_is_refused(tmp_path, capsys):
    (tmp_path / "ck").mkdir()
    for rel in cd.CHECKOUT_FILES:
        (tmp_path / "ck" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "ck" / rel).write_text("")
    assert cd.main(["--dphubert", str(tmp_path / "ck"), "--out", str(tmp_path / "out"),
                    "pruning.target_kind=macs"]) == 2
    assert "pruning.target_kind: DPHuBERT's code has a params sparsity target only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ with a checkout
@needs_checkout
def test_loading_the_checkout_leaves_our_prune_package_and_sys_modules_alone(dp):
    import prune

    assert Path(prune.__file__).resolve().parent == REPO / "prune"
    assert not any(name.split(".")[0] in cd._LOAD_NAMES for name in sys.modules)
    assert str(dp.checkout) not in sys.path
    assert hasattr(dp.prune, "prune_from_ckpt") and hasattr(dp.lightning, "DistillModule")


@needs_checkout
@pytest.mark.parametrize("preset", ["hubert_base_tiny", "wav2vec2_base_tiny", "hubert_large_tiny"])
def test_converted_teacher_reproduces_prunes_hidden_states(dp, preset):
    torch.manual_seed(0)
    teacher = build_preset(preset).eval()
    ckpt = cd.dphubert_checkpoint(dp, teacher)
    model = cd.build_dphubert(dp, ckpt)
    waves, lengths = padded_batch()
    errors = cd.check_parity(model, teacher, waves, lengths)
    assert len(errors) == teacher.config.encoder_num_layers + 1 and max(errors) <= 1e-5
    # DPHuBERT's own hidden 0 is another tensor (before the positional conv): the convention matters
    raw, frames = model.extract_features(waves, lengths)
    ours, _ = teacher(waves, lengths)
    assert cd._valid_rel_error(raw[0], ours[0], frames) > 0.1
    for i in range(1, len(ours) - 1):  # layers 1..N as extract_features gives them
        assert cd._valid_rel_error(raw[i], ours[i], frames) <= 1e-5


@needs_checkout
def test_parity_check_catches_a_wrong_conversion(dp):
    teacher = build_preset("hubert_base_tiny").eval()
    ckpt = cd.dphubert_checkpoint(dp, teacher)
    ckpt["state_dict"]["encoder.transformer.layers.1.feed_forward.output_dense.weight"] *= 1.01
    with pytest.raises(cd.CompareError, match=r"does not reproduce .*layer 2: "):
        cd.check_parity(cd.build_dphubert(dp, ckpt), teacher, *padded_batch())


@needs_checkout
def test_teachers_that_do_not_map_are_refused(dp, monkeypatch):
    with pytest.raises(cd.CompareError, match="WavLM teacher is not supported"):
        cd.dphubert_checkpoint(dp, build_preset("wavlm_base_tiny"))
    teacher = build_preset("hubert_base_tiny")
    state = teacher.state_dict()
    state["encoder.extra.weight"] = torch.zeros(1)
    monkeypatch.setattr(teacher, "state_dict", lambda: state)
    with pytest.raises(cd.CompareError, match=r"no counterpart: \['encoder.extra.weight'\]"):
        cd.dphubert_checkpoint(dp, teacher)


@needs_checkout
def test_crop_batches_are_cut_to_the_shortest_and_pad_batches_unchanged(dp):
    waves, lengths = padded_batch()
    crop = next(cd.as_dphubert_batches(iter([Batch(waves, lengths)]), dp.audio.CollateFnAudio(pad=False)))
    assert crop[0].shape == (3, 4000) and crop[1].tolist() == [4000] * 3
    assert any(torch.equal(crop[0][0], waves[0, k:k + 4000]) for k in range(9000 - 4000))  # a window of row 0
    pad = next(cd.as_dphubert_batches(iter([Batch(waves, lengths)]), dp.audio.CollateFnAudio(pad=True)))
    assert torch.equal(pad[0], waves) and torch.equal(pad[1], lengths)


@needs_checkout
@pytest.mark.skipif(not (DEMO_CORPUS / "transcripts.tsv").exists(), reason="no demo corpus")
def test_dphubert_side_end_to_end_and_resumed(tmp_path, capsys):
    corpus = demo_corpus_split(tmp_path / "corpus", n_train=8)
    out = tmp_path / "out"
    argv = ["--dphubert", CHECKOUT, "--recipe", "tiny_demo", "--seeds", "0", "--probe-seeds", "0", "1",
            "--out", str(out), "--skip-prune", f"data.train_manifest={corpus / 'train.tsv'}", "data.valid_manifest=null",
            f"probe.corpus={corpus}", "probe.steps=5", "trainer.prune_steps=4", "trainer.final_steps=2",
            "pruning.warmup_steps=2", "optim.warmup_steps=2", "optim.final_warmup_steps=1", "trainer.threads=1"]
    assert cd.main(argv) == 0
    report = json.loads((out / "compare.json").read_text())
    teacher, student = report["rows"]
    assert teacher["run"] == "teacher" and student["run"] == "DPHuBERT seed 0"
    assert sorted(student["probe_valid_per"]) == ["0", "1"] and 0 < student["params"] < teacher["params"]
    training = json.loads((out / "dphubert_s0" / "training.json").read_text())
    assert training["prune_stage"]["steps"] == 4 and training["final_stage"]["steps"] == 2
    assert training["final_stage"]["lr"] == pytest.approx(1e-3 / 2)  # no optim.final_lr: half of optim.lr
    assert max(training["parity_errors"]) <= 1e-5
    assert "| DPHuBERT's code | 1 |" in (out / "compare.md").read_text()
    mtime = (out / "dphubert_s0" / "final.pth").stat().st_mtime_ns
    capsys.readouterr()
    assert cd.main([*argv, "trainer.log_every=7"]) == 0  # everything reused: logging changes no result
    assert (out / "dphubert_s0" / "final.pth").stat().st_mtime_ns == mtime
    assert json.loads((out / "compare.json").read_text())["rows"] == report["rows"]
    assert cd.main([*argv, "--dphubert-batches", "pad"]) == 2  # other settings: refused, nothing mixed
    assert "holds results of another comparison (differs in: dphubert_batches)" in capsys.readouterr().err
