"""Every file in configs/ trains a step, shrunk in size only, single-process and at tp = 2.

Shrinking keeps what can break (the hierarchy's kinds and groups, the task, precision, dropout, qk-norm,
the fused front end, the parallel mode, the output channels) and cuts what only costs time: pixels
(two patch rows), width (4 per head, same heads), depth (1), channels (2 per level-1 group + 1, so groups
are uneven) and samples. A new config is picked up by the glob: it cannot be added without passing.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dchag.configure import load_config
from dchag.data import channel_names
from dchag.parallel.launch import spawn
from dchag.train.loop import train

CONFIGS = sorted(Path(__file__).parents[1].glob("configs/*.yaml"))


def shrink_overrides(path: Path) -> list[str]:
    """`--set` overrides that shrink the config at `path` in size only."""
    cfg = load_config(path)
    m, d = cfg.model, cfg.data
    p = m.patch_size
    groups = max(cfg.model.hierarchy.groups, 2)
    out = [
        f"model.img_size=[{2 * p}, {4 * p}]",
        f"model.embed_dim={4 * math.lcm(m.num_heads, m.hierarchy.heads or m.num_heads)}",
        "model.depth=1",
        f"model.decoder_dim={4 * m.decoder_heads}",
        "model.decoder_depth=1",
        "data.num_samples=16",
        "train.steps=1",
        "train.batch_size=2",
        "train.warmup_steps=0",
        "train.checkpoint_every=0",
    ]
    if d.kind == "era5" and d.grid != "native":
        out.append(f"data.grid=[{2 * p}, {4 * p}]")
    wanted = 2 * groups + 1
    if isinstance(d.channels, int) and d.channels > wanted:
        names = channel_names(d)
        keep = set(d.out_channels or []) if cfg.train.task == "forecast" else set()
        keep |= set([n for n in names if n not in keep][: wanted - len(keep)])
        out.append(f"data.channels=[{', '.join(n for n in names if n in keep)}]")
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_trains_a_step_on_one_process(path, tmp_path):
    cfg = load_config(path, shrink_overrides(path))
    full = load_config(path)
    assert (cfg.train.bf16, cfg.model.drop_rate, cfg.model.hierarchy.preset) == (
        full.train.bf16,
        full.model.drop_rate,
        full.model.hierarchy.preset,
    )
    summary = train(cfg, tmp_path, progress=False)
    assert math.isfinite(summary["final_loss"])
    assert (tmp_path / "checkpoints").is_dir()


def _train_every_config_at_tp2() -> dict:
    """Runs on each of 2 ranks: one step of every shipped config at tp = 2."""
    results = {}
    for path in CONFIGS:
        cfg = load_config(path, [*shrink_overrides(path), "parallel.tp=2"])
        torch.manual_seed(0)
        results[path.stem] = train(cfg, None, progress=False)["final_loss"]
    return results


@pytest.fixture(scope="module")
def tp2():
    return spawn(_train_every_config_at_tp2, 2)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_trains_a_step_at_tp2(tp2, path):
    losses = [rank[path.stem] for rank in tp2]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[0] == losses[1]  # the logged loss is the mean over ranks: the same everywhere
