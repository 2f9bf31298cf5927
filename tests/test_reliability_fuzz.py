"""Property tests: any value for a config key either passes ``compose`` + ``validate`` or fails
with a Hydra / OmegaConf / ConfigError whose message names the key, never another exception;
any manifest goes through the up-front check as usable files, skipped files or a ManifestError.

(The manifest parser's own garbage-line properties are in test_data_manifest.py.)
"""

import math
from pathlib import Path

import pytest
from helpers_train import noise_corpus
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from prune.train.config import ConfigError, compose, validate
from prune.data.dataset import validate_manifest
from prune.data.manifest import ManifestError, read_manifest

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

KEYS = ["trainer.prune_steps", "trainer.grad_accum", "trainer.threads", "trainer.precision", "trainer.max_nonfinite",
        "trainer.keep_last", "pruning.target", "pruning.target_kind", "pruning.tolerance", "optim.lr",
        "optim.clip_grad_norm", "optim.betas", "data.batch_size", "data.max_samples", "distill.layers",
        "distill.mode", "logging.tensorboard", "teacher.preset", "teacher.checkpoint", "data.train_manifest"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10 ** 12, 10 ** 12), st.floats(),
    st.text(st.characters(blacklist_categories=["Cs"]), max_size=12),
)
values = st.one_of(
    scalars,
    st.lists(st.integers(-5, 20), max_size=3),
    st.lists(st.lists(st.integers(-5, 20), max_size=3), max_size=3),
    st.lists(st.floats(width=32), max_size=3),
    st.lists(scalars, max_size=2),
)


def render(value) -> str:
    """A Python value as Hydra override syntax."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return "[" + ",".join(render(v) for v in value) + "]"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return noise_corpus(tmp_path_factory.mktemp("corpus"), n_train=2, n_valid=1)


@FUZZ
@given(key=st.sampled_from(KEYS), value=values)
def test_any_value_passes_or_fails_naming_the_key(corpus, tmp_path, key, value):
    train, valid = corpus
    base = [f"data.train_manifest={train}", f"data.valid_manifest={valid}"]
    override = f"{key}={render(value)}"
    try:
        cfg = compose("tiny_demo", [*base, override])
        validate(cfg, tmp_path / "run")
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        assert key in str(e), f"{override!r} -> {type(e).__name__}: {e}"


@FUZZ
@given(keys=st.lists(st.sampled_from(KEYS), min_size=2, max_size=3, unique=True), data=st.data())
def test_several_bad_values_fail_naming_one_of_them(corpus, tmp_path, keys, data):
    overrides = {k: data.draw(values, label=k) for k in keys}
    train, valid = corpus
    base = [f"data.train_manifest={train}", f"data.valid_manifest={valid}"]
    try:
        validate(compose("tiny_demo", [*base, *(f"{k}={render(v)}" for k, v in overrides.items())]),
                 tmp_path / "run")
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        assert any(k in str(e) for k in keys), f"{overrides} -> {type(e).__name__}: {e}"


@pytest.mark.parametrize("override,key", [
    ("distill.layers=[[0],3]", "distill.layers"),  # OmegaConf alone names only the index ("1: Invalid value")
    ("distill.layers=['a']", "distill.layers"),
    ("+teacher.overrides.foo=1", "teacher.overrides"),  # EncoderConfig's own TypeError, reported as the key
])
def test_errors_inside_lists_and_overrides_name_the_key(corpus, tmp_path, override, key):
    train, valid = corpus
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose("tiny_demo", [f"data.train_manifest={train}", f"data.valid_manifest={valid}", override]),
                 tmp_path / "run")


def test_run_dir_under_a_file_is_one_line(corpus, tmp_path):
    from helpers_train import prune_cli, short_run_args

    (tmp_path / "file").write_text("x")
    result = prune_cli(short_run_args(*corpus, tmp_path / "file" / "run", prune_steps=2, final_steps=0))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-500:]
    assert result.stderr.strip().splitlines()[-1].startswith("prune train: run directory:")


# ------------------------------------------------------------------------------ manifests
paths = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\t\n\r"), min_size=1, max_size=20)
lines = st.one_of(
    st.tuples(paths, st.integers(0, 10 ** 6)).map(lambda t: f"{t[0]}\t{t[1]}"),  # well-formed, mostly missing
    st.sampled_from(["0.flac\t16000", "1.flac\t8000", "../audio/0.flac\t1", "audio\t0"]),  # real files
    st.text(max_size=20),  # anything
)


@FUZZ
@given(root=st.sampled_from(["audio", ".", "/", "nowhere"]), body=st.lists(lines, max_size=8))
def test_any_manifest_is_checked_without_surprises(corpus, tmp_path, root, body):
    """Parse, then check every file up front: usable files, skipped files with a reason, or a
    ManifestError naming the manifest; never another exception."""
    manifest = tmp_path / "m.tsv"
    manifest.write_text("\n".join([str(Path(corpus[0]).parent / root) if root == "audio" else root, *body]) + "\n",
                        encoding="utf-8", errors="surrogatepass")
    try:
        m = read_manifest(manifest)
        good, skipped = validate_manifest(m)
    except ManifestError as e:
        assert str(e).startswith(str(manifest)), str(e)
        return
    assert good and all(reason for reason in skipped.values())
    assert len(good) + len(skipped) <= len(m)  # a path listed twice is counted once when skipped
