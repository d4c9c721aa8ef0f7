"""Hostile files through every entry point that reads from outside.

Each crafted input (built here, in temporary folders) goes through the guarded reader's
users: server-folder import, uploads, zip members, thumbnails, the training/scoring
loader and the rows stored for a project. For each the test asserts a clear one-sentence
message (no traceback), nothing written outside the data directory, no partial rows,
and for bombs a bounded peak memory (measured in a child process).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_mvtec

REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20


@pytest.fixture(autouse=True)
def _db():
    import db

    db.init_db()


# --- crafted inputs -------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(w: int, h: int, zero_rows: bool) -> bytes:
    """A grey PNG of w x h: its rows of zeros really compressed in (a cheap real bomb),
    or only a header that claims the size."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    c = zlib.compressobj(9)
    body = b""
    if zero_rows:
        row = bytes(w + 1)
        body = b"".join(c.compress(row) for _ in range(h)) + c.flush()
    else:
        body = c.compress(bytes(w + 1)) + c.flush()
    return b"\x89PNG\r\n\x1a\n" + ihdr + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def gif_declaring(w: int, h: int) -> bytes:
    """A GIF whose logical screen is w x h around one real pixel."""
    return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00" + b"\x3b")


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _texture(size=40, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)


def _animated_gif() -> bytes:
    frames = [Image.fromarray(_texture(32, i)).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _palette_png() -> bytes:
    im = Image.new("P", (32, 32), 1)
    im.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    return _encoded(im, "PNG", transparency=0)


# name -> (file name, bytes); refused by the reader whatever the entry point
BAD = {
    "png_header_50000x50000": ("huge.png", lambda: png_declaring(50_000, 50_000, False)),
    "png_real_100_megapixels": ("big.png", lambda: png_declaring(10_000, 10_000, True)),
    "gif_screen_65535x65535": ("screen.gif", lambda: gif_declaring(65_535, 65_535)),
    "png_truncated": ("cut.png", lambda: _encoded(Image.fromarray(_texture(64)), "PNG")[:900]),
    "jpeg_truncated": ("cut.jpg", lambda: _encoded(Image.fromarray(_texture(64)), "JPEG")[:700]),
    "zero_bytes": ("empty.png", lambda: b""),
    "text_named_png": ("notes.png", lambda: b"just some text, not an image\n" * 4),
}
# name -> (file name, bytes); odd but fine: decoded to the RGB the pipeline expects
ODD = {
    "jpeg_cmyk": ("cmyk.jpg", lambda: _encoded(Image.new("CMYK", (40, 30), (0, 120, 200, 10)), "JPEG")),
    "png_16bit": ("deep.png", lambda: _encoded(Image.fromarray((np.arange(1200, dtype=np.uint16) * 50)
                                                                .reshape(30, 40)), "PNG")),
    "png_palette_transparent": ("pal.png", _palette_png),
    "png_la": ("la.png", lambda: _encoded(Image.new("LA", (40, 30), (90, 10)), "PNG")),
    "gif_animated": ("anim.gif", _animated_gif),
    "jpeg_named_png": ("photo.png", lambda: _encoded(Image.fromarray(_texture(40)), "JPEG")),
}


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> dict[str, Path]:
    """Every crafted file, built once (the 100-Mpx PNG takes a fraction of a second)."""
    d = tmp_path_factory.mktemp("crafted")
    out = {}
    for key, (fname, make) in {**BAD, **ODD}.items():
        (d / key).mkdir()
        out[key] = d / key / fname
        out[key].write_bytes(make())
    return out


def good_png(path: Path, seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_texture(40, seed)).save(path)
    return path


def files_outside_data(tmp_path: Path) -> set[str]:
    from db import data_dir

    d = data_dir().resolve()
    return {str(p) for p in tmp_path.rglob("*") if d not in p.resolve().parents and p.resolve() != d}


def clear(msg: str) -> None:
    """One sentence for a person: no traceback, no code location, one line."""
    assert msg and "Traceback" not in msg and 'File "' not in msg and "\n" not in msg, msg


def counts() -> tuple[int, int]:
    from db import session_scope
    from db import queries as q

    with session_scope() as s:
        projects = q.list_projects(s)
        return len(projects), sum(p["images"] for p in projects)


def peak_rss_mb(code: str, setup: str = "") -> float:
    """Growth of the peak RSS (MB) of a child process while it runs ``code`` (after ``setup``)."""
    script = (f"import json, resource, sys\nsys.path.insert(0, {str(REPO)!r})\n{setup}\n"
              "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              f"try:\n    {code}\n    outcome = 'accepted'\nexcept Exception as exc:\n    outcome = str(exc)\n"
              "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "print(json.dumps({'mb': (peak - base) / 1024, 'outcome': outcome}))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["outcome"] != "accepted", "the bomb was accepted"
    clear(out["outcome"])
    return out["mb"]


# --- bad images: refused by the reader, skipped by every entry point ------------------------


@pytest.mark.parametrize("kind", BAD)
def test_reader_refuses_with_one_sentence(kind, crafted):
    from osad_core.errors import ImageRefused
    from osad_core.safeio import read_image

    with pytest.raises(ImageRefused) as err:
        read_image(crafted[kind])
    clear(str(err.value))
    assert f"`{crafted[kind].name}`" in str(err.value)


@pytest.mark.parametrize("kind", BAD)
def test_folder_import_skips_it_and_keeps_the_rest(kind, crafted, tmp_path):
    from ui import ingest

    folder = tmp_path / "flat"
    good_png(folder / "a.png", 1)
    good_png(folder / "b.png", 2)
    shutil.copy(crafted[kind], folder / crafted[kind].name)
    before = files_outside_data(tmp_path)
    c = ingest.create_from_folder(str(folder), "flat")
    assert c.images == 2 and counts() == (1, 2)
    note = c.notes[-1]
    clear(note)
    assert note.startswith("skipped 1 file(s)") and f"`{crafted[kind].name}`" in note
    assert files_outside_data(tmp_path) == before


@pytest.mark.parametrize("kind", BAD)
@pytest.mark.parametrize("how", ["file", "zip_member"])
def test_upload_skips_it_and_leaves_no_file(kind, how, crafted):
    from ui import ingest

    name, data = crafted[kind].name, crafted[kind].read_bytes()
    if how == "zip_member":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("set/a.png", _encoded(Image.fromarray(_texture(40, 1)), "PNG"))
            zf.writestr(f"set/{name}", data)
        files = [("set.zip", buf.getvalue())]
    else:
        files = [("a.png", _encoded(Image.fromarray(_texture(40, 1)), "PNG")), (name, data)]
    c = ingest.create_from_uploads(files, "up")
    assert c.images == 1 and counts() == (1, 1)
    clear(c.notes[-1])
    assert f"`{name}`" in c.notes[-1]
    stored = sorted(p.name for p in ingest.uploads_dir().rglob("*") if p.is_file())
    assert stored == ["a.png"]  # the refused file was not kept
    # all bad: nothing is created and no folder is left
    with pytest.raises(ingest.IngestError) as err:
        ingest.create_from_uploads([(name, data)], "bad only")
    clear(str(err.value))
    assert "nothing was created" in str(err.value) and counts() == (1, 1)
    assert len(list(ingest.uploads_dir().iterdir())) == 1  # only the first project's folder


@pytest.mark.parametrize("kind", BAD)
def test_thumbnail_is_a_placeholder_and_large_view_one_sentence(kind, crafted):
    from osad_core.errors import DataError
    from ui import thumbs

    assert thumbs.thumbnail(str(crafted[kind]), f"hash-{kind}") is None
    with pytest.raises(DataError) as err:
        thumbs.view_image(str(crafted[kind]))
    clear(str(err.value))


@pytest.mark.parametrize("kind", BAD)
def test_training_loader_and_stored_rows_skip_it(kind, crafted, tmp_path):
    from osad_core.data import ImageCache, ImageRecord
    from osad_core.store import image_items

    good = good_png(tmp_path / "good.png")
    recs = [ImageRecord(str(good), 0), ImageRecord(str(crafted[kind]), 0)]
    arr, ok, bad = ImageCache().load_many(recs, 32)
    assert arr.shape == (1, 32, 32, 3) and [r.path for r in ok] == [str(good)]
    assert bad[0][0] == str(crafted[kind])
    clear(bad[0][1])
    skipped: list = []
    rows = image_items(recs, str(tmp_path), skipped=skipped, decode=True)
    assert [r["path"] for r in rows] == [str(good)] and skipped[0][0] == str(crafted[kind])


@pytest.mark.parametrize("kind", ["png_header_50000x50000", "png_real_100_megapixels", "gif_screen_65535x65535"])
def test_image_bomb_memory_stays_bounded(kind, crafted):
    mb = peak_rss_mb(f"read_image({str(crafted[kind])!r})", "from osad_core.safeio import read_image")
    assert mb < 100, f"{kind}: peak RSS grew by {mb:.0f} MB"


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    from osad_core.errors import ImageRefused
    from osad_core.safeio import read_image

    p = good_png(tmp_path / "a.png")  # 40 x 40
    assert read_image(p).size == (40, 40)
    monkeypatch.setenv("OSAD_MAX_PIXELS", "1000")
    with pytest.raises(ImageRefused, match="more than the 1,000 allowed"):
        read_image(p)


# --- odd but valid images: decoded to RGB everywhere ---------------------------------------


@pytest.mark.parametrize("kind", ODD)
def test_odd_image_becomes_rgb_and_is_imported(kind, crafted, tmp_path):
    from osad_core.data import ImageCache, ImageRecord
    from osad_core.safeio import read_image
    from ui import ingest, thumbs

    im = read_image(crafted[kind])
    assert im.mode == "RGB" and im.size[0] > 0
    arr, ok, bad = ImageCache().load_many([ImageRecord(str(crafted[kind]), 0)], 24)
    assert arr.shape == (1, 24, 24, 3) and not bad
    if kind == "png_16bit":
        assert arr.max() > 200  # scaled to 8 bits, not clipped to black
    assert thumbs.thumbnail(str(crafted[kind]), f"odd-{kind}") is not None
    folder = good_png(tmp_path / "flat" / "a.png").parent
    shutil.copy(crafted[kind], folder)
    c = ingest.create_from_folder(str(folder), "odd")
    assert c.images == 2 and len(c.notes) == 1, c.notes  # nothing skipped


def test_large_jpeg_is_decoded_reduced_when_little_is_needed(tmp_path):
    from osad_core.safeio import read_image

    p = tmp_path / "photo.jpg"
    Image.new("RGB", (4000, 3000), (90, 120, 150)).save(p, quality=70)
    small = read_image(p, reduce_to=192, reduce_above=4_000_000)
    assert max(small.size) <= 1000 and min(small.size) >= 192  # JPEG draft: 1/8 scale, never below the need
    assert read_image(p).size == (4000, 3000)


# --- zips ---------------------------------------------------------------------------------


def _zip(members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in members:
            zf.writestr(info, data)
    return buf.getvalue()


def zip_bomb(path: Path, member_mb: int = 300) -> Path:
    """A small zip with one image-named member of ``member_mb`` MB of zeros, streamed."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("bomb/huge.png", "w", force_zip64=True) as f:
            block = bytes(MB)
            for _ in range(member_mb):
                f.write(block)
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return zip_bomb(tmp_path_factory.mktemp("bomb") / "bomb.zip")


def test_zip_bomb_is_refused_with_bounded_memory(bomb, tmp_path):
    from ui import ingest

    assert bomb.stat().st_size < 400_000  # ~318 KB that would expand to 300 MB
    before = files_outside_data(tmp_path)
    with pytest.raises(ingest.IngestError) as err:
        ingest.create_from_uploads([("bomb.zip", bomb.read_bytes())], "bomb")
    clear(str(err.value))
    assert "nothing was created" in str(err.value) and counts() == (0, 0)
    assert not ingest.uploads_dir().exists() or not any(ingest.uploads_dir().iterdir())
    assert files_outside_data(tmp_path) == before
    out = tmp_path / "child"
    mb = peak_rss_mb(f"save_upload([('bomb.zip', data)], Path({str(out)!r}))",
                     f"from pathlib import Path\nfrom ui.ingest import save_upload\ndata = open({str(bomb)!r}, 'rb').read()")
    assert mb < 100, f"rejecting the zip bomb grew the peak RSS by {mb:.0f} MB"


SLIP, ABSOLUTE = "a path leading out of the archive (`..`)", "an absolute path"


@pytest.mark.parametrize("member, why", [
    ("../../escaped.png", SLIP),
    ("ok/../../../up.png", SLIP),
    ("/tmp/osad-absolute.png", ABSOLUTE),
    ("C:/windows.png", ABSOLUTE),
], ids=["zip_slip", "zip_slip_nested", "zip_absolute", "zip_drive_letter"])
def test_zip_slip_and_absolute_members_are_skipped(member, why, tmp_path):
    from ui import ingest

    png = _encoded(Image.fromarray(_texture(40)), "PNG")
    before = files_outside_data(tmp_path)
    c = ingest.create_from_uploads([("slip.zip", _zip([("ok/a.png", png), (member, png)]))], "slip")
    assert c.images == 1 and counts() == (1, 1)
    clear(c.notes[-1])
    assert c.notes[-1] == f"skipped 1 file(s): `{member}` ({why})"
    assert files_outside_data(tmp_path) == before and not Path("/tmp/osad-absolute.png").exists()
    assert [p.name for p in ingest.uploads_dir().rglob("*") if p.is_file()] == ["a.png"]


def test_zip_symlink_member_is_skipped(tmp_path):
    from ui import ingest

    link = zipfile.ZipInfo("set/passwd.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    data = _zip([("set/a.png", _encoded(Image.fromarray(_texture(40)), "PNG")), (link, b"/etc/passwd")])
    c = ingest.create_from_uploads([("links.zip", data)], "links")
    assert c.images == 1 and "`set/passwd.png` (a link)" in c.notes[-1]
    assert not any(p.is_symlink() for p in ingest.uploads_dir().rglob("*"))


def test_zip_with_too_many_members_is_refused(tmp_path, monkeypatch):
    from ui import ingest

    monkeypatch.setenv("OSAD_MAX_ZIP_MEMBERS", "50")
    data = _zip([(f"m/{i}.png", b"x") for i in range(51)])
    with pytest.raises(ingest.IngestError, match="51 entries, more than the 50 allowed") as err:
        ingest.create_from_uploads([("many.zip", data)], "many")
    clear(str(err.value))
    assert counts() == (0, 0) and (not ingest.uploads_dir().exists() or not any(ingest.uploads_dir().iterdir()))


# --- server folders -----------------------------------------------------------------------


def _refusal(path: str) -> str:
    from ui import ingest

    with pytest.raises(ingest.DataError) as err:
        ingest.create_from_folder(path, "x")
    msg = str(err.value)
    clear(msg)
    return msg.replace(f"`{path}`", "`…`")


def test_paths_outside_the_roots_missing_or_not_folders_read_the_same(tmp_path, monkeypatch):
    root = tmp_path / "root"
    make_mvtec(root / "parts", n_train=2, n_test_good=1, n_defect=1)
    (root / "file.txt").write_text("x")
    outside = make_mvtec(tmp_path / "outside", n_train=2, n_test_good=1, n_defect=1)
    monkeypatch.setenv("OSAD_IMPORT_ROOTS", str(root))
    msgs = {_refusal(p) for p in (str(outside), "/etc", "/root", str(root / "missing"), str(root / "file.txt"),
                                  str(root / "parts" / ".." / ".." / "outside"))}
    assert len(msgs) == 1, msgs
    assert counts() == (0, 0)


def test_default_root_is_the_data_dir(tmp_path, monkeypatch):
    from db import data_dir
    from ui import ingest

    monkeypatch.delenv("OSAD_IMPORT_ROOTS")
    assert ingest.import_roots() == [str(data_dir())]
    _refusal(str(make_mvtec(tmp_path / "parts", n_train=2, n_test_good=1, n_defect=1)))
    inside = make_mvtec(data_dir() / "sets" / "parts", n_train=2, n_test_good=1, n_defect=1)
    assert ingest.create_from_folder(str(inside)).images == 5


def test_hidden_folders_are_refused_and_never_descended(tmp_path):
    from ui import ingest

    flat = tmp_path / "flat"
    good_png(flat / "a.png")
    good_png(flat / ".git" / "secret.png")
    good_png(flat / "sub" / ".cache" / "secret2.png")
    good_png(tmp_path / ".hidden" / "x.png")
    assert "cannot be imported" in _refusal(str(tmp_path / ".hidden"))
    c = ingest.create_from_folder(str(flat), "flat")
    assert c.images == 1 and counts() == (1, 1)


def test_symlink_out_of_the_root_is_not_followed(tmp_path, monkeypatch):
    from ui import ingest

    root = tmp_path / "root"
    secret = good_png(tmp_path / "secret" / "s.png")
    flat = root / "flat"
    good_png(flat / "a.png")
    (flat / "leak.png").symlink_to(secret)
    (flat / "dir").symlink_to(secret.parent, target_is_directory=True)
    (root / "alias").symlink_to(secret.parent, target_is_directory=True)
    monkeypatch.setenv("OSAD_IMPORT_ROOTS", str(root))
    c = ingest.create_from_folder(str(flat), "flat")
    assert c.images == 1 and counts() == (1, 1)
    clear(c.notes[-1])
    assert "links outside the folders allowed" in c.notes[-1]
    _refusal(str(root / "alias"))  # a linked top folder resolves outside: refused like any other


def test_non_utf8_file_names_are_skipped_not_fatal(tmp_path):
    from osad_core.data import load_folder
    from ui import ingest

    flat = tmp_path / "flat"
    good_png(flat / "a.png")
    bad = os.path.join(os.fsencode(flat), b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    with open(bad, "wb") as f:
        f.write(_encoded(Image.fromarray(_texture(40)), "PNG"))
    os.makedirs(os.path.join(os.fsencode(tmp_path / "mv" / "test"), b"d\xe9fect"))
    make_mvtec(tmp_path / "mv", n_train=2, n_test_good=1, n_defect=1)
    ds = load_folder(flat)  # the CLI's reader
    assert len(ds.records) == 1 and "not valid UTF-8" in ds.skipped[0][1]
    c = ingest.create_from_folder(str(flat), "flat")
    assert c.images == 1 and "caf\ufffd.png" in c.notes[-1]
    clear(c.notes[-1])
    c2 = ingest.create_from_folder(str(tmp_path / "mv"), "mv")
    assert c2.images == 5 and "`d\ufffdfect` was skipped: its name is not valid UTF-8" in c2.notes[-1]


# --- markup, ownership, concurrency, scoring uploads ---------------------------------------

XSS = "<img src=x onerror=alert(1)>"


def test_pages_escape_html_in_a_defect_type_and_survive_a_bomb(tmp_path, monkeypatch):
    """A folder named like markup becomes a defect type shown (escaped) on Projects, Label
    and Train; an image replaced by a bomb after import is a placeholder on the Label grid."""
    from streamlit.testing.v1 import AppTest

    from ui import ingest

    monkeypatch.setenv("OSAD_AUTOSTART_WORKER", "0")
    parts = make_mvtec(tmp_path / "parts", n_train=2, n_test_good=1, defects=(XSS,), n_defect=2)
    c = ingest.create_from_folder(str(parts), "xss")
    (parts / "train" / "good" / "000.png").write_bytes(png_declaring(50_000, 50_000, False))
    # the import made every thumbnail while the file was sound; without them (a project made
    # before imports made thumbnails) the grid reads the bomb itself
    import shutil

    from ui import thumbs

    assert thumbs.thumbs_dir().is_dir()
    shutil.rmtree(thumbs.thumbs_dir())
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=90)
    at.session_state["project_id"] = c.project_id
    at.run()
    seen = []
    for page in ("projects", "label", "train"):
        at.switch_page(f"pages/{page}.py").run()
        assert not at.exception, [e.value for e in at.exception]
        html_blocks = [m.value for m in at.markdown if m.proto.allow_html]
        assert not any(XSS in b for b in html_blocks), page
        seen += [b for b in html_blocks if "&lt;img src=x onerror=alert(1)&gt;" in b]
        if page == "label":
            assert [e.value for e in at.error] == ["unreadable image"]  # the bomb's card, the page lives
    assert len(seen) >= 3  # the chip is drawn (escaped) on Projects, Label and Train


def test_deleting_a_project_made_inside_another_projects_uploads_keeps_its_files(tmp_path, monkeypatch):
    from db import data_dir
    from ui import ingest

    monkeypatch.setenv("OSAD_IMPORT_ROOTS", str(data_dir()))
    png = _encoded(Image.fromarray(_texture(40)), "PNG")
    a = ingest.create_from_uploads([("set.zip", _zip([("set/x/a.png", png), ("set/x/b.png", png)]))], "a")
    folder = next(ingest.uploads_dir().iterdir())
    files = sorted(folder.rglob("*"))
    b = ingest.create_from_folder(str(folder), "b")           # the whole upload folder of a
    c = ingest.create_from_folder(str(folder / "set" / "x"), "c")  # a folder inside it
    ingest.delete_project(c.project_id)
    ingest.delete_project(b.project_id)
    assert sorted(folder.rglob("*")) == files and counts() == (1, 2)
    ingest.delete_project(a.project_id)  # the owner removes what it made
    assert not folder.exists() and counts() == (0, 0)


def test_concurrent_thumbnails_never_collide(tmp_path):
    from ui import thumbs

    src = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 700, 3), np.uint8)).save(src)
    errors, paths = [], []
    start = threading.Barrier(20)

    def make():
        try:
            start.wait()
            paths.append(thumbs.thumbnail(str(src), "same-key"))
        except Exception as exc:  # noqa: BLE001 - any failure is the test's finding
            errors.append(repr(exc))

    workers = [threading.Thread(target=make) for _ in range(20)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors and len(paths) == 20 and len(set(paths)) == 1 and paths[0].is_file()
    assert max(Image.open(paths[0]).size) == thumbs.THUMB_SIZE
    assert [p.name for p in paths[0].parent.iterdir()] == [paths[0].name]  # no temp file left


def test_scored_uploads_get_unique_names_and_are_removed(tmp_path):
    from ui import ingest

    a, b = (_encoded(Image.fromarray(_texture(40, i)), "PNG") for i in (1, 2))
    zipped = _zip([("one/part.png", a), ("two/part.png", b)])
    with ingest.scoring_folder() as folder:
        paths, notes = ingest.save_upload([("part.png", a), ("part.png", b), ("z.zip", zipped)], folder,
                                          nothing="nothing was scored")
        assert len(paths) == len(set(paths)) == 4 and not notes
        assert sorted(Path(p).read_bytes() for p in paths) == sorted([a, b, a, b])
    assert not folder.exists()
    old = ingest.uploads_dir() / "scoring" / "left-by-a-crash"
    old.mkdir(parents=True)
    os.utime(old, (0, 0))
    with ingest.scoring_folder():
        pass
    assert not old.exists()  # swept by age


# --- a training job with an undecodable image ------------------------------------------------


def test_training_job_skips_an_undecodable_image_and_completes(tmp_path):
    from db import session_scope
    from db import queries as q
    from osad_core.worker import run_worker
    from ui import fmt, ingest

    parts = make_mvtec(tmp_path / "parts", n_train=6, n_test_good=3, n_defect=3)
    c = ingest.create_from_folder(str(parts), "parts")
    (parts / "train" / "good" / "000.png").write_bytes(png_declaring(50_000, 50_000, False))  # changed later
    tiny = {"weights": "random", "backbone": "resnet18", "image_size": 64}
    proto = {"setting": "general", "shots": 1, "seed": 0}
    with session_scope() as s:
        run = q.create_run(s, c.project_id, "devnet", "tiny", tiny, proto, "app")
        job = q.enqueue_job(s, "train", {"project_id": c.project_id, "method": "devnet", "preset": "tiny",
                                         "overrides": tiny, "protocol": proto}, run_id=run.id)
        run_id, job_id = run.id, job.id
    assert run_worker(once=True) == 0
    with session_scope() as s:
        job = q.get_job(s, job_id)
        assert job.status == "done", job.error
        assert q.get_run(s, run_id).status == "done"
        msg = job.progress_json.get("message", "")
        assert msg.startswith("skipped 1 unreadable image(s)") and "`000.png`" in msg
        clear(msg)
        run = q.get_run(s, run_id)
        assert fmt.skipped_text(run).startswith("1 unreadable image(s) skipped, e.g. `000.png` declares more")
        scored = {r["rel_path"] for r in q.run_scores(s, run_id)}
        assert "train/good/001.png" in scored and "train/good/000.png" not in scored
