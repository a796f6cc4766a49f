"""Loading never runs code from a file: exported weights are safetensors, and a training checkpoint's
metadata goes through an unpickler that admits only checkpoint types. A crafted file is refused in one
line and its callable never runs."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import reliability_workers as RW
import torch

from dchag.cli import main
from dchag.config import ConfigError
from dchag.model import build_model
from dchag.train.checkpoint import complete_checkpoints, read_logical_weights
from dchag.train.export import export_weights, load_exported
from dchag.train.loop import train
from dchag.train.safe_metadata import UnsafeCheckpoint, read_metadata_safely


class Payload:
    """Unpickling this runs `touch MARKER` (what an attacker would put in a checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    train(RW.resume_config("train.steps=2", "train.checkpoint_every=0"), folder, progress=False)
    return folder


def test_export_writes_safetensors_that_rebuild_the_model(run, tmp_path):
    path = export_weights(run, tmp_path / "model.safetensors")
    cfg, weights = load_exported(path)
    model = build_model(cfg)
    model.load_state_dict(weights, strict=True)
    expected = read_logical_weights(complete_checkpoints(run)[-1])
    assert all(torch.equal(weights[k], v) for k, v in expected.items())


def test_the_export_command_writes_an_export_folder_beside_the_run(run, capsys):
    assert main(["export", "--run", str(run)]) == 0
    assert (run / "export" / "model.safetensors").is_file() and "export" in capsys.readouterr().err
    assert main(["export", "--run", str(run), "--out", str(run / "weights.safetensors")]) == 0
    assert (run / "weights.safetensors").is_file()  # a .safetensors name: the weights alone, as before


def test_a_pickle_posing_as_exported_weights_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    fake = tmp_path / "model.safetensors"
    torch.save({"w": Payload(marker)}, fake)
    with pytest.raises(ConfigError, match="is not a safetensors file"):
        load_exported(fake)
    assert not marker.exists()


def test_checkpoint_metadata_with_a_pickled_callable_is_refused_unrun(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted"
    shutil.copytree(complete_checkpoints(run)[-1], crafted)
    (crafted / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeCheckpoint, match=r"refers to posix\.system.*refusing to load it"):
        read_metadata_safely(crafted / ".metadata")
    # through every entry point that reads checkpoints: resume, eval's reader, export
    code = main(
        ["train", "--out", str(tmp_path / "out"), "--resume", str(crafted), "--no-progress", "--set", *RW.RESUME_MODEL]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "posix.system" in err, err
    with pytest.raises(UnsafeCheckpoint):
        read_logical_weights(crafted)
    assert (
        main(["export", "--run", str(run), "--checkpoint", str(crafted), "--out", str(tmp_path / "x.safetensors")]) == 2
    )
    assert not marker.exists()


def test_genuine_metadata_passes_the_restricted_unpickler(run):
    metadata = read_metadata_safely(complete_checkpoints(run)[-1] / ".metadata")
    assert "model.pos_embed" in metadata.state_dict_metadata
