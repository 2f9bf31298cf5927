"""A task head on a model whose hidden dimension is cut (#16 x #17): the head computes on the
compiled student what it computed on the gated one, through a training run, its export, and
`prune export CHECKPOINT` (which writes the task head too, from a gated or a cut checkpoint)."""

import pytest
import torch
from helpers import max_rel_error, randomize_gates
from helpers_train import noise_corpus, prune_cli, short_run_args, voice_labels

from prune.checkpoints import read_export_info
from prune.compile import compile_encoder
from prune.data.labels import Vocabulary
from prune.evaluate.task import evaluate_task
from prune.models import build_preset, preset_config
from prune.structures import GateConfig, GatedEncoder
from prune.train.student import hidden_kept
from prune.train.task import HEAD_FILE, INFO_FILE, build_head, load_task_head, task_writer

TOL = 1e-5
VOCAB = Vocabulary.build(["a b", "c d e"], "ctc")  # 6 symbols with the blank


@pytest.fixture(scope="module")
def cut_pair():
    torch.manual_seed(0)
    gated = GatedEncoder(build_preset("hubert_base_tiny"), GateConfig(hidden_dim=True), skip_closed=False)
    randomize_gates(gated, seed=1)
    gated.eval()
    compiled = compile_encoder(gated)
    x, lengths = torch.randn(2, 16000), torch.tensor([16000, 11000])
    with torch.no_grad():
        return gated(x, lengths), compiled(x, lengths), compiled.config


@pytest.mark.parametrize("kind, layer, pooling", [("ctc", None, "mean"), ("ctc", 2, "mean"),
                                                  ("classify", None, "attentive"), ("classify", None, "mean")])
def test_the_head_on_the_cut_model_computes_what_it_did_on_the_gated_one(cut_pair, tmp_path, kind, layer, pooling):
    (gated_h, frames), (cut_h, cut_frames), cfg = cut_pair
    D = gated_h[0].shape[-1]
    kept = hidden_kept(preset_config("hubert_base_tiny"), cfg)
    assert kept is not None and len(kept) < D - 3 and torch.equal(frames, cut_frames)
    torch.manual_seed(2)
    head = build_head(kind, len(gated_h), D, VOCAB, layer, pooling).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p))  # layer weights, score and classes away from their init
        expected = head(gated_h, frames)
        # reading the kept channels alone (a LayerNorm over them, the kept columns) is not it
        naive = build_head(kind, len(gated_h), len(kept), VOCAB, layer, pooling).eval()
        state = {k: (v[..., kept] if v.dim() == 2 and v.shape[-1] == D else v) for k, v in head.state_dict().items()}
        naive.load_state_dict(state)
        head.mix.keep_inputs(kept, D)
        actual = head(cut_h, frames)
    assert max_rel_error([actual], [expected]) < TOL
    if layer is None:  # the LayerNorm counts the removed channels: without them the result moves
        assert max_rel_error([naive(cut_h, frames)], [expected]) > 1e-3
    # saved and read back as an export's head
    record = {"kind": kind, "layer": layer, "pooling": pooling}
    task_writer(head, record, len(gated_h), VOCAB)(tmp_path)
    loaded, info, vocab = load_task_head(tmp_path)
    assert info["hidden_kept"] == kept and info["dim"] == D and vocab.to_dict() == VOCAB.to_dict()
    with torch.no_grad():
        assert torch.equal(loaded(cut_h, frames), actual)


def test_a_task_run_with_a_cut_hidden_dimension_and_its_checkpoints_export_the_head(tmp_path):
    train, valid = noise_corpus(tmp_path / "corpus")
    labels = voice_labels(tmp_path, train, valid)
    run = tmp_path / "run"
    done = prune_cli(short_run_args(train, valid, run, prune_steps=10, final_steps=4,
                                    extra=["task=classify", f"task.labels={labels}", "pruning.gates.hidden_dim=true",
                                           "pruning.target=0.6", "trainer.ckpt_every=5", "trainer.threads=1"]))
    assert done.returncode == 0, done.stderr[-3000:]
    kept = read_export_info(run / "export")["config"]["encoder_embed_dim"]
    info = load_task_head(run / "export")[1]
    assert info["hidden_kept"] is not None and len(info["hidden_kept"]) == kept < info["dim"]
    reference = evaluate_task(str(run / "export"), str(valid))
    assert reference["value"] == pytest.approx(info["valid_metric"], abs=1e-9)
    # the last checkpoint (cut, final stage) and one of the pruning stage (gated: cut by the export)
    for step, stage in ((14, "done"), (5, "prune")):
        out = tmp_path / f"from_{step}"
        line = prune_cli(["export", str(run / "checkpoints" / f"step_{step:08d}.pt"), str(out)])
        assert line.returncode == 0, line.stderr[-2000:]
        assert (out / HEAD_FILE).is_file() and (out / INFO_FILE).is_file()
        meta = read_export_info(out)["metadata"]
        assert meta["stage"] == stage and meta["task"]["kind"] == "classify"
        result = evaluate_task(str(out), str(valid))  # loads the head onto this export's hidden states
        if stage == "done":
            assert (out / HEAD_FILE).read_bytes() == (run / "export" / HEAD_FILE).read_bytes()
            assert result["value"] == pytest.approx(reference["value"], abs=1e-9)
