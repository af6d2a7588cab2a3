"""Initialisation: RDED-style patches (factor 1 and 2x2 mosaics), random real images, Gaussian noise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cvdd.data.augment import Normalize
from cvdd.data.sources import load_dataset
from cvdd.errors import DataError
from cvdd.models import create_model
from cvdd.synthesis.init import class_images, class_indices, gaussian_init, patch_init, real_init


def _observer(classes: int, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("convnet_d3_w32", classes, size).eval()


def test_real_init_is_seeded_per_class_and_index(digits) -> None:
    a = real_init(digits, 3, 4, seed=0)
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, real_init(digits, 3, 4, seed=0))
    assert torch.equal(real_init(digits, 3, 2, seed=0), a[:2])  # index k is the k-th of one seeded draw
    assert not torch.equal(a, real_init(digits, 3, 4, seed=1))
    with pytest.raises(DataError, match="fewer than the 100000 needed"):
        real_init(digits, 0, 100_000, seed=0)


def test_patch_init_factor_one_and_two(digits) -> None:
    obs = _observer(10, 32)
    one = patch_init(digits, 2, 3, obs, seed=0, candidates=30, crops=2, factor=1)
    assert one.shape == (3, 3, 32, 32) and one.dtype == torch.uint8
    assert torch.equal(one, patch_init(digits, 2, 3, obs, seed=0, candidates=30, crops=2, factor=1))
    mosaic = patch_init(digits, 2, 3, obs, seed=0, candidates=30, crops=2, factor=2)
    assert mosaic.shape == (3, 3, 32, 32)
    # Each quadrant is a nearest-neighbour upscaled 16x16 patch: at 32 px exactly 16 px, so no blending.
    assert not torch.equal(mosaic[:, :, :16, :16], mosaic[:, :, 16:, 16:])
    with pytest.raises(DataError, match="needs 400 candidate images"):
        patch_init(digits, 2, 100, obs, seed=0, candidates=1000, crops=1, factor=2)


def test_patch_init_does_not_depend_on_its_scoring_chunks(digits) -> None:
    """Crops are cut and scored a chunk of candidates at a time (memory); the chosen patches are the same."""
    obs = _observer(10, 32)
    for factor in (1, 2):
        whole = patch_init(digits, 4, 3, obs, seed=1, candidates=40, crops=3, factor=factor, batch_size=1000)
        for batch_size in (2, 7, 64):  # one image per chunk, uneven chunks, several chunks
            chunked = patch_init(
                digits, 4, 3, obs, seed=1, candidates=40, crops=3, factor=factor, batch_size=batch_size
            )
            assert torch.equal(chunked, whole), (factor, batch_size)


def test_patch_init_scores_crops_in_the_normalised_range(digits) -> None:
    """The observer must see crops as a network sees images (bug: 0..255 floats were normalised as [0, 1])."""
    seen: list[torch.Tensor] = []
    obs = _observer(10, 32)
    obs.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    patch_init(digits, 2, 3, obs, seed=0, candidates=30, crops=2, factor=1)
    mean, std = Normalize(digits.spec).stats(torch.device("cpu"))
    lo, hi = float(((0 - mean) / std).min()), float(((1 - mean) / std).max())
    x = torch.cat(seen)
    assert lo - 1e-4 <= float(x.min()) and float(x.max()) <= hi + 1e-4
    assert float(x.max()) - float(x.min()) > 0.5 * (hi - lo)  # real pixels span most of the range


def test_patch_init_on_a_streamed_224px_dataset(tiny_folder: Path) -> None:
    ds = load_dataset(tiny_folder, image_size=224, progress=False)
    idx = class_indices(ds, 1)
    assert len(idx) == 5 and class_images(ds, idx[:2]).shape == (2, 3, 224, 224)
    out = patch_init(ds, 1, 1, _observer(3, 224), seed=0, candidates=5, crops=1, factor=2)
    assert out.shape == (1, 3, 224, 224)


def test_gaussian_init_is_seeded() -> None:
    a = gaussian_init(2, 8, 0, "k", 1)
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, gaussian_init(2, 8, 0, "k", 1))
    assert not torch.equal(a, gaussian_init(2, 8, 0, "k", 2))


def test_init_cache_first_writer_wins_and_a_class_it_cannot_write_stays_in_memory(tmp_path: Path, caplog) -> None:
    from cvdd.synthesis.init import InitCache

    def version(value: int):
        return lambda c: torch.full((3, 3, 4, 4), value + c, dtype=torch.uint8)

    first = InitCache(tmp_path / "cache", version(10))
    late = InitCache(tmp_path / "cache", version(50))  # a rank whose arithmetic gave other pixels
    assert int(first.get(1, 0)[0, 0, 0]) == 11
    assert int(late.get(1, 2)[0, 0, 0]) == 11  # it reads the first writer's file, not its own version
    # a writer that made the class at the same time, but published second, uses the first one's file too
    lost_race = InitCache(tmp_path / "cache", lambda c: (first.get(c, 0), version(50)(c))[1])
    assert int(lost_race.get(2, 1)[0, 0, 0]) == 12
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["class_00001.npy", "class_00002.npy"]
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the folder should be")  # the folder cannot be made: nothing is written
    made = []
    cache = InitCache(blocked, lambda c: made.append(c) or version(0)(c))
    assert int(cache.get(3, 1)[0, 0, 0]) == 3 and int(cache.get(4, 0)[0, 0, 0]) == 4
    assert int(cache.get(3, 2)[0, 0, 0]) == 3 and made == [3, 4]  # kept in memory: made once each
    assert caplog.text.count("initial images not written") == 1
