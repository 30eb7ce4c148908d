"""The procedural sprites (issue 9): factor addressing against brute-force enumeration, the fast renderer against
a per-pixel reference, the geometry (translation by whole pixels, rotational symmetries, nothing at the border),
the registered source with its splits and a few training steps, and the checks of the real-dSprites loader."""

import itertools

import numpy as np
import pytest
import torch

from elbolab.data.sprites import (
    DSPRITES_FILE,
    FACTOR_SIZES,
    RenderedRows,
    Sprites,
    draw_direct,
    factors_of,
    find_dsprites,
    read_dsprites,
    row_of,
)
from elbolab.errors import DataError, ElbolabError


@pytest.fixture(scope="module")
def sprites():
    return Sprites()


def images(sprites, factors):
    return sprites.render(row_of(np.asarray(factors))).reshape(-1, 64, 64).numpy()


def test_rows_and_factors_follow_the_enumeration_order():
    sizes = (1, 3, 2, 4, 2)
    listed = np.array(list(itertools.product(*[range(s) for s in sizes])))  # the last factor varies fastest
    assert np.array_equal(factors_of(np.arange(len(listed)), sizes), listed)
    assert np.array_equal(row_of(listed, sizes), np.arange(len(listed)))
    rows = np.random.default_rng(0).integers(0, np.prod(FACTOR_SIZES), 1000)
    assert np.array_equal(row_of(factors_of(rows)), rows)
    assert np.prod(FACTOR_SIZES) == 737_280
    with pytest.raises(ElbolabError, match="factor indices"):
        row_of([[0, 3, 0, 0, 0, 0]])
    with pytest.raises(ElbolabError, match="row numbers"):
        factors_of([737_280])


def test_fast_renderer_matches_the_per_pixel_reference(sprites):
    factors = sprites.sample_factors(150, np.random.default_rng(1))
    corners = np.array([[0, s, 5, o, p, q] for s in range(3) for o in (0, 7) for p in (0, 31) for q in (0, 31)])
    factors = np.concatenate([factors, corners])
    assert np.array_equal(sprites.render(row_of(factors)).numpy(), draw_direct(factors))


def test_every_sprite_is_drawn_inside_the_image(sprites):
    # the largest of each shape at the four extreme positions, every orientation: nothing on the outer pixels
    factors = np.array([[0, s, 5, o, p, q] for s in range(3) for o in range(40) for p in (0, 31) for q in (0, 31)])
    x = images(sprites, factors)
    border = x[:, 0].any(1) | x[:, -1].any(1) | x[:, :, 0].any(1) | x[:, :, -1].any(1)
    assert not border.any()
    smallest = images(sprites, [[0, s, 0, o, 16, 16] for s in range(3) for o in range(40)])
    assert smallest.sum((1, 2)).min() >= 20  # even the smallest sprite is a visible blob


def test_factors_change_the_image_as_named(sprites):
    base = np.array([0, 2, 3, 11, 10, 12])

    def variant(**changes):
        f = base.copy()
        for name, value in changes.items():
            f[["color", "shape", "scale", "orientation", "posX", "posY"].index(name)] = value
        return images(sprites, [f])[0]

    x = variant()
    # 3 position steps are exactly 4 pixels: the same sprite, shifted
    assert np.array_equal(variant(posX=13), np.roll(x, 4, axis=1))
    assert np.array_equal(variant(posY=15), np.roll(x, 4, axis=0))
    # scale grows the area roughly with its square (0.5 .. 1 over six steps)
    areas = [variant(scale=k).sum() for k in range(6)]
    assert all(a < b for a, b in zip(areas, areas[1:]))
    assert 3.0 < areas[-1] / areas[0] < 5.0
    # the three shapes differ from one another at the same pose
    shapes = [variant(shape=k) for k in range(3)]
    assert all((a != b).sum() > 10 for a, b in itertools.combinations(shapes, 2))


def test_rotation_is_about_the_centre_with_each_shapes_symmetry(sprites):
    # position 2 puts the centre on the corner of pixels 13 and 14, where a quarter turn maps the pixel grid onto
    # itself: a turn of the sprite is a turn of the 24 x 24 crop about that point
    def at(shape, orientation):
        image = images(sprites, [[0, shape, 5, orientation, 2, 2]])[0]
        crop = image[2:26, 2:26]
        assert crop.sum() == image.sum()  # the whole sprite lies in the crop
        return crop

    for o in range(0, 40, 3):
        assert np.array_equal(at(0, (o + 10) % 40), at(0, o))  # the square: quarter turns
        assert np.array_equal(at(1, (o + 20) % 40), at(1, o))  # the ellipse: half turns
        assert np.array_equal(at(2, (o + 10) % 40), np.rot90(at(2, o)))  # the heart: counter-clockwise
        assert not np.array_equal(at(2, (o + 20) % 40), at(2, o))  # and no half-turn symmetry
    heart = at(2, 0)
    assert np.array_equal(heart, heart[:, ::-1])  # upright at orientation 0: mirror-symmetric
    rows = np.nonzero(heart.any(1))[0]
    assert heart[rows[0] + 1].sum() > heart[rows[-1] - 1].sum()  # the lobes at the top, the tip at the bottom


def test_sample_factors_and_images_protocol(sprites):
    rng = np.random.default_rng(3)
    f = sprites.sample_factors(2000, rng)
    assert f.shape == (2000, 6) and (f.min(0) == 0).all() and np.array_equal(f.max(0) + 1, FACTOR_SIZES)
    x = sprites.images(f[:5])
    assert x.dtype == torch.float32 and x.shape == (5, 4096) and set(x.unique().tolist()) <= {0.0, 1.0}


def test_sprites_source_splits_and_trains_a_few_steps(tmp_path, monkeypatch):
    import elbolab.data
    from elbolab import pipeline
    from elbolab.data import load_data

    splits = load_data("sprites", seed=3, val_size=500)  # row numbers only: images are drawn per batch
    n = 737_280
    assert (len(splits.train), len(splits.val), len(splits.test)) == (n - 10_500, 500, 10_000)
    rows = torch.cat([splits.train.source_index, splits.val.source_index, splits.test.source_index])
    assert torch.equal(rows.sort().values, torch.arange(n))  # a partition of every combination
    for part in (splits.train, splits.val, splits.test):
        assert isinstance(part.x, RenderedRows) and part.image_shape == (1, 64, 64)
        assert part.meta["factor_sizes"] == list(FACTOR_SIZES) and part.meta["factor_names"][1] == "shape"
    assert torch.equal(splits.val.y, torch.from_numpy(factors_of(splits.val.source_index.numpy())))
    # --train-size N takes the first N training rows: a uniform sample of the grid, not its first corner
    head = splits.train.head(2000).y
    assert all(len(head[:, k].unique()) == size for k, size in enumerate(FACTOR_SIZES))
    assert abs(float(head[:, 3].float().mean()) - 19.5) < 1.5  # orientation's mean index, (40 - 1) / 2
    picked = torch.tensor([0, 777, len(splits.train) - 1])
    assert np.array_equal(splits.train.x[picked].numpy(),
                          draw_direct(factors_of(splits.train.source_index[picked].numpy())))
    batch = splits.train.head(2000).batch(picked[:2])  # a slice keeps the rows; a batch is float 0/1
    assert batch.x.dtype == torch.float32 and torch.equal(batch.x, splits.train.x[picked[:2]].float())
    # the same splits through the pipeline (not drawn twice), with --train-size: a few steps in seconds
    asked = {}

    def same_splits(**options):
        asked.update(options)
        return splits

    monkeypatch.setitem(elbolab.data.SOURCES, "sprites", same_splits)
    run = pipeline.train("vae", "sprites", out=tmp_path / "run", epochs=1, train_size=64, val_size=500,
                         latent_dim=4, hidden=(32,), batch_size=32, progress=False, tensorboard=False,
                         figures=False)
    assert asked["val_size"] == 500 and (run / "model.safetensors").is_file()


def test_splits_depend_on_the_seed_only():
    from elbolab.data.sprites import split_rows

    a = split_rows(1000, seed=4, val_size=100, n_test=50, source="s")
    b = split_rows(1000, seed=4, val_size=200, n_test=50, source="s")
    c = split_rows(1000, seed=5, val_size=100, n_test=50, source="s")
    assert torch.equal(a[2], b[2]) and not torch.equal(a[2], c[2])  # the test split ignores val_size
    assert not any(torch.equal(part, part.sort().values) for part in a)  # shuffled: first rows = a uniform sample
    assert (len(a[0]), len(a[1]), len(a[2])) == (850, 100, 50)


def fake_dsprites(path, sizes=(1, 3, 2, 2, 2, 2), **overrides):
    n = int(np.prod(sizes))
    classes = factors_of(np.arange(n), sizes)
    arrays = {"imgs": (np.random.default_rng(0).random((n, 64, 64)) < 0.1).astype(np.uint8),
              "latents_classes": classes, "latents_values": classes.astype(np.float64)}
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_dsprites_file_is_read_and_addressed_by_factor(tmp_path):
    arrays = fake_dsprites(tmp_path / DSPRITES_FILE)
    data = read_dsprites(find_dsprites(tmp_path))
    assert data.factor_sizes == (1, 3, 2, 2, 2, 2) and data.imgs.dtype == torch.bool
    f = np.array([[0, 2, 1, 0, 1, 1], [0, 0, 0, 1, 0, 1]])
    expected = arrays["imgs"][row_of(f, data.factor_sizes)].reshape(2, -1).astype(np.float32)
    assert np.array_equal(data.images(f).numpy(), expected)


def test_dsprites_source_reads_from_elbolab_data(tmp_path, monkeypatch):
    from elbolab.data import load_data

    (tmp_path / "dsprites").mkdir()
    arrays = fake_dsprites(tmp_path / "dsprites" / DSPRITES_FILE, sizes=(1, 3, 2, 5, 2, 2))  # 120 images
    monkeypatch.setenv("ELBOLAB_DATA", str(tmp_path))
    splits = load_data("dsprites", seed=1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (84, 18, 18)  # 15% test, 15% validation
    rows = splits.train.source_index
    dense = splits.train.rows(torch.arange(len(rows)))
    assert torch.equal(dense, torch.from_numpy(arrays["imgs"][rows.numpy()].reshape(len(rows), -1) > 0).float())
    assert torch.equal(splits.train.y, torch.from_numpy(arrays["latents_classes"][rows.numpy()]))
    assert splits.test.meta["factor_sizes"] == [1, 3, 2, 5, 2, 2]


@pytest.mark.parametrize("overrides, message", [
    ({"latents_classes": None}, "lacks latents_classes"),
    ({"imgs": np.zeros((48, 32, 32), np.uint8)}, r"imgs of shape \[N, 64, 64\]"),
    ({"latents_classes": np.zeros((48, 5), np.int64)}, r"latents_classes of shape \[48, 6\]"),
    ({"latents_values": np.zeros((48, 5))}, r"latents_values of the shape of latents_classes \[48, 6\]"),
    ({"imgs": np.full((48, 64, 64), 255, np.uint8)}, "binary imgs"),
    ({"latents_classes": factors_of(np.arange(48), (1, 3, 2, 2, 2, 2))[::-1].copy()}, "every factor combination"),
])
def test_dsprites_file_errors_say_what_is_wrong(tmp_path, overrides, message):
    fake_dsprites(tmp_path / "d.npz", **overrides)
    with pytest.raises(DataError, match=message):
        read_dsprites(tmp_path / "d.npz")


def test_missing_dsprites_names_the_places_searched(tmp_path, monkeypatch):
    monkeypatch.delenv("ELBOLAB_DATA", raising=False)
    with pytest.raises(DataError, match="--data sprites"):
        find_dsprites(tmp_path)
    (tmp_path / "notes.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        read_dsprites(tmp_path / "notes.npz")
