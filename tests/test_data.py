import numpy as np
import pytest
from PIL import Image

from osad_core.data import DataError, ImageCache, ImageRecord, import_elpv, import_headct, load_folder


def test_mvtec_layout(mvtec_dir):
    ds = load_folder(mvtec_dir)
    assert len(ds.select(split="train", label=0)) == 12
    assert len(ds.select(split="test", label=0)) == 6
    assert ds.defect_types == ["hole", "scratch"]
    an = ds.select(label=1)
    assert len(an) == 12 and all(r.mask_path and r.mask_path.endswith("_mask.png") for r in an)


def test_flat_folder_is_unlabelled(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a b.png", "sub/c.jpg"):
        Image.new("RGB", (20, 10), "red").save(tmp_path / name)
    ds = load_folder(tmp_path)
    assert sorted(r.name for r in ds.records) == ["a b.png", "c.jpg"]
    assert all(r.label == -1 for r in ds.records)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no images"):
        load_folder(tmp_path / "empty")


def test_odd_files_decode_to_rgb(tmp_path):
    """Grayscale, 16-bit, RGBA, palette, JPEG and BMP all become (S, S, 3) uint8."""
    g = (np.arange(30 * 40) % 256).astype(np.uint8).reshape(30, 40)
    Image.fromarray(g, "L").save(tmp_path / "gray image.png")
    Image.fromarray(g.astype(np.uint16) * 200).save(tmp_path / "deep.png")  # 16-bit PNG
    Image.new("RGBA", (16, 16), (10, 20, 30, 0)).save(tmp_path / "alpha.png")
    Image.new("P", (16, 16)).save(tmp_path / "pal.gif")
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "photo.JPG")
    Image.new("RGB", (16, 16), "green").save(tmp_path / "scan.bmp")
    cache = ImageCache()
    for p in sorted(tmp_path.iterdir()):
        arr = cache.get(str(p), 24)
        assert arr.shape == (24, 24, 3) and arr.dtype == np.uint8, p.name
    deep = cache.get(str(tmp_path / "deep.png"), 24)
    assert deep.max() > 200  # 16-bit scaled, not clipped to black


def test_corrupt_file_is_reported_and_skipped(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    arr, ok, skipped = ImageCache().load_many([ImageRecord(str(good), 0), ImageRecord(str(bad), 0)], 16)
    assert arr.shape == (1, 16, 16, 3)
    assert [r.path for r in ok] == [str(good)]
    assert skipped[0][0] == str(bad) and "not a readable image" in skipped[0][1]


def test_cache_decodes_once(tmp_path, monkeypatch):
    p = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(p)
    calls = []
    import osad_core.data as data

    real = data.read_image
    monkeypatch.setattr(data, "read_image", lambda path, **kw: calls.append(path) or real(path, **kw))
    cache = ImageCache()
    a = cache.get(str(p), 16)
    b = cache.get(str(p), 16)
    assert a is b and len(calls) == 1


def test_elpv_importer_matches_the_papers_split():
    ds = import_elpv()
    assert len(ds.select(split="train", label=0)) == 1131
    assert len(ds.select(split="test", label=0)) == 377
    assert len(ds.select(label=1, defect_type="mono")) == 313
    assert len(ds.select(label=1, defect_type="poly")) == 402


def test_headct_importer(headct_dir):
    ds = import_headct(headct_dir)
    assert len(ds.select(split="train", label=0)) == 75
    test_normal = sorted(int(r.name.split(".")[0]) for r in ds.select(split="test", label=0))
    assert test_normal[:5] == [100, 104, 110, 112, 118] and len(test_normal) == 25
    assert len(ds.select(label=1, defect_type="hemorrhage")) == 100
