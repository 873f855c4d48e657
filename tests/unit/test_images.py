"""Image grids: tile placement with padding, uint8 conversion and the PNG writer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.images import make_grid, save_grid, to_uint8


def tiles(n, c=1, h=2, w=3):
    """Tile i is constant 10 * (i + 1) + channel."""
    x = torch.zeros(n, c, h, w, dtype=torch.uint8)
    for i in range(n):
        for ch in range(c):
            x[i, ch] = 10 * (i + 1) + ch
    return x


def test_make_grid_offsets_and_padding():
    grid = make_grid(tiles(5), pad=1)  # nrow = ceil(sqrt(5)) = 3 tiles per row, 2 rows
    assert grid.shape == (2 * (2 + 1) + 1, 3 * (3 + 1) + 1, 1) and grid.dtype == np.uint8
    # tile i sits at row i // 3, column i % 3: top-left (1 + r * 3, 1 + q * 4)
    expected_origin = {0: (1, 1), 1: (1, 5), 2: (1, 9), 3: (4, 1), 4: (4, 5)}
    mask = np.zeros(grid.shape[:2], bool)
    for i, (y, x) in expected_origin.items():
        assert (grid[y:y + 2, x:x + 3, 0] == 10 * (i + 1)).all(), i
        mask[y:y + 2, x:x + 3] = True
    assert (grid[~mask] == 0).all()  # padding and the empty 6th slot are black
    assert int((grid > 0).sum()) == 5 * 6


def test_make_grid_explicit_nrow_and_pad():
    grid = make_grid(tiles(4, h=3, w=2), nrow=1, pad=2)  # a single column of 4 tiles
    assert grid.shape == (4 * (3 + 2) + 2, 1 * (2 + 2) + 2, 1)
    for i in range(4):
        y = 2 + i * 5
        assert (grid[y:y + 3, 2:4, 0] == 10 * (i + 1)).all()
        assert (grid[y - 2:y, :, 0] == 0).all()  # the padding rows above each tile


def test_make_grid_no_padding_is_a_plain_mosaic():
    grid = make_grid(tiles(4, h=2, w=2), pad=0)
    expected = np.array([[10, 10, 20, 20],
                         [10, 10, 20, 20],
                         [30, 30, 40, 40],
                         [30, 30, 40, 40]], np.uint8)
    assert np.array_equal(grid[..., 0], expected)


def test_make_grid_rgb_channels_last():
    grid = make_grid(tiles(2, c=3), nrow=2, pad=1)
    assert grid.shape == (1 * 3 + 1, 2 * 4 + 1, 3)
    assert grid[1, 1].tolist() == [10, 11, 12]   # tile 0, channels 0..2
    assert grid[1, 5].tolist() == [20, 21, 22]   # tile 1


def test_to_uint8():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0])
    # (x + 1) * 127.5: 0, 0, 127.5 -> 128 (round half to even), 191.25 -> 191, 255, 255
    assert to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255]
    assert to_uint8(x).dtype == torch.uint8


@pytest.mark.parametrize("scale", [1, 3])
def test_save_grid_png(tmp_path, scale):
    imgs = tiles(4, h=8, w=8)  # 2 x 2 grid of 8px tiles, pad 2 -> 22 x 22
    path = save_grid(imgs, tmp_path / "out" / "grid.png", scale=scale)
    assert path == tmp_path / "out" / "grid.png" and path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temp file left
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L"
        assert im.size == (22 * scale, 22 * scale)
        arr = np.asarray(im)
    # nearest-neighbour upscaling: pixel (y, x) of the grid becomes a scale x scale block
    assert np.array_equal(arr, np.kron(make_grid(imgs), np.ones((scale, scale, 1), np.uint8))[..., 0])
    assert arr[2 * scale, 12 * scale] == 20  # tile 1's top-left pixel


def test_save_grid_float_rgb(tmp_path):
    imgs = torch.zeros(3, 3, 8, 8)
    imgs[:, 0] = 1.0   # red = 255
    imgs[:, 1] = -1.0  # green = 0
    path = save_grid(imgs, tmp_path / "rgb.png", scale=1)
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.size == (22, 22)  # nrow = 2: 2 rows x 2 columns
        assert im.getpixel((2, 2)) == (255, 0, 128)
        assert im.getpixel((0, 0)) == (0, 0, 0)
        assert im.getpixel((12, 12)) == (0, 0, 0)  # the 4th slot is empty


def test_save_grid_default_scale_is_integer_upscale(tmp_path):
    imgs = tiles(16, h=8, w=8)  # 4 x 4 of 8 px: grid 42 x 42
    path = save_grid(imgs, tmp_path / "g.png")
    with Image.open(path) as im:
        w, h = im.size
    assert w == h and w % 42 == 0 and w >= 42
