"""Building the default model: byte-identical across builds and processes, published atomically."""

import dataclasses
import hashlib
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from libs.common.checkpoint import verify
from libs.common.errors import FailedPrecondition
from libs.default_model.build import build
from libs.default_model.config import BuildConfig
from libs.default_model.pretrain import lr_at

REPO = pathlib.Path(__file__).resolve().parents[3]
FEW_STEPS = dataclasses.replace(BuildConfig(), max_steps=3)


def digests(directory: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> pathlib.Path:
    # The caller's own thread count and RNG state must neither leak into the build nor be changed by it.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    try:
        out = build(tmp_path_factory.mktemp("first") / "model", FEW_STEPS)
        assert torch.get_num_threads() == 2
        assert torch.equal(torch.get_rng_state(), state)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_two_builds_are_byte_identical(built, tmp_path):
    # The second build runs in a fresh process through the CLI, with other thread settings
    # (OpenMP, and the tokenizer trainer serial instead of parallel), so no state of this
    # process can make the two agree by accident.
    second = tmp_path / "model"
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    run = subprocess.run(
        [sys.executable, "-m", "cli.main", "model", "build-default", "--output_dir", str(second), "--max_steps", "3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(second)
    assert "pre-training the default model" in run.stderr  # the progress bar
    assert digests(built) == digests(second)
    assert len(digests(built)) == 8


def test_build_is_published_with_a_manifest(built):
    manifest = verify(built)
    assert sorted(manifest["files"]) == sorted(p.name for p in built.iterdir() if p.name != "manifest.json")
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".tmp-")]


def test_a_different_seed_gives_different_weights(built, tmp_path):
    other = build(tmp_path / "model", dataclasses.replace(FEW_STEPS, seed=FEW_STEPS.seed + 1))
    ours, theirs = digests(built), digests(other)
    assert ours["model.safetensors"] != theirs["model.safetensors"]
    assert ours["tokenizer.json"] == theirs["tokenizer.json"]  # the tokenizer does not depend on the seed


def test_refuses_a_non_empty_output_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FailedPrecondition) as caught:
        build(tmp_path, FEW_STEPS)
    assert caught.value.field == "output_dir" and str(tmp_path) in str(caught.value)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = dataclasses.replace(BuildConfig(), max_steps=100, warmup_steps=10, learning_rate=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(1e-4)
    assert lr_at(9, config) == pytest.approx(1e-3)
    assert lr_at(10, config) == pytest.approx(1e-3)
    assert lr_at(99, config) == pytest.approx(1e-4)
    values = [lr_at(step, config) for step in range(10, 100)]
    assert values == sorted(values, reverse=True)
