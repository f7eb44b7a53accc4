"""mem_analysis.board: scalars split into one TensorBoard run per duplication factor; image grids."""
from __future__ import annotations

import numpy as np

from mem_analysis.board import FactorWriters, pair_grid, split_by_factor


def test_split_by_factor_strips_the_suffix_and_keeps_other_tags():
    plain, by_factor = split_by_factor({"probe/loss_cfg_7.5/dup_64": 1.0, "probe/loss_cfg_7.5/dup_1": 2.0,
                                        "eval/D_x/dup_16": 3.0, "eval/pearson_D_x_severity": 0.5,
                                        "warning/dup_ratio": 4.0})
    assert plain == {"eval/pearson_D_x_severity": 0.5, "warning/dup_ratio": 4.0}
    assert by_factor == {64: {"probe/loss_cfg_7.5": 1.0}, 1: {"probe/loss_cfg_7.5": 2.0}, 16: {"eval/D_x": 3.0}}


def test_factor_writers_write_one_run_per_factor_with_the_same_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writers = FactorWriters(tmp_path)
    for step in (0, 10):
        rest = writers.log({"probe/k/dup_4": step + 4.0, "probe/k/dup_64": step + 64.0, "train/loss": 1.0}, step)
        assert rest == {"train/loss": 1.0}
    writers.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dup_4", "dup_64"]
    for factor in (4, 64):
        events = EventAccumulator(str(tmp_path / f"dup_{factor}")).Reload()
        assert events.Tags()["scalars"] == ["probe/k"]
        assert [(e.step, e.value) for e in events.Scalars("probe/k")] == [(0, factor), (10, 10 + factor)]


def test_pair_grid_puts_top_row_above_bottom_row_with_white_gaps():
    top = np.zeros((3, 4, 5, 3), dtype=np.uint8)
    bottom = np.full((3, 4, 5, 3), 100, dtype=np.uint8)
    top[1] = 50
    grid = pair_grid(top, bottom, pad=2, min_size=4)  # no enlargement: 4 px images
    assert grid.shape == (2 * 4 + 3 * 2, 3 * 5 + 4 * 2, 3)
    assert (grid[2:6, 2:7] == 0).all() and (grid[2:6, 9:14] == 50).all()  # top row: images 0 and 1
    assert (grid[8:12, 2:7] == 100).all()  # bottom row below the first image
    assert (grid[0:2] == 255).all() and (grid[6:8] == 255).all() and (grid[:, 7:9] == 255).all()
    enlarged = pair_grid(top, bottom, pad=2, min_size=12)  # 4 px -> 12 px (factor 3, nearest pixel)
    assert enlarged.shape == (2 * 12 + 3 * 2, 3 * 15 + 4 * 2, 3) and (enlarged[2:14, 19:34] == 50).all()
