"""End to end in a real headless Chromium: start the app, create a project from a
folder, tag images (mouse, Shift-click and keyboard), train with the tiny preset through the app's
own worker, and find the AUROC, a ROC curve, a t-SNE map and a heatmap on screen.

Needs Debian's ``chromium`` and the ``playwright`` package (its driver ships with it;
no browser download). Screenshots go to ``<tmp>/screens`` (printed), or to
``$OSAD_SCREENSHOT_DIR`` when set.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import make_mvtec

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the app did not start")


def _settle(page) -> None:
    """Wait (up to 10 s) until Streamlit has no script run in progress: a click that lands
    during a rerun can be lost when the element is re-rendered."""
    try:
        page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
                               timeout=10_000)
    except Exception:
        pass


def _box(page, image_id: int, part: str = "input"):
    """An image's checkbox (``part``: its input or label). While the app reruns after it
    changed the selection, the card also holds the previous checkbox, hidden (Streamlit keeps
    a replaced element until the run ends): only the visible one counts."""
    return page.locator(f".st-key-sel_{image_id} {part}:visible")


def _tick(page, expect, image_id: int) -> None:
    """Tick an image's checkbox in the grid, retrying a click lost to a rerun."""
    box = _box(page, image_id)
    for _ in range(3):
        _settle(page)
        _box(page, image_id, "label").click()
        try:
            expect(box).to_be_checked(timeout=15_000)
            return
        except AssertionError:
            continue
    expect(box).to_be_checked()


def _tick_until(page, expect, image_id: int, text: str) -> None:
    """Tick an image and wait for the page to say ``text``; a tick that reached the browser
    but whose rerun was lost on a busy machine is unticked and ticked again."""
    for _ in range(2):
        _tick(page, expect, image_id)
        try:
            expect(page.get_by_text(text)).to_be_visible(timeout=20_000)
            return
        except AssertionError:
            _box(page, image_id, "label").click()
    _tick(page, expect, image_id)  # the last try ends ticked, with the full timeout
    expect(page.get_by_text(text)).to_be_visible()


def _image_ids(project_id: int) -> dict[str, int]:
    from db import session_scope
    from db import queries as q

    with session_scope() as s:
        return {im.rel_path: im.id for im in q.get_images(s, project_id)}


def _image(image_id: int):
    from db import session_scope
    from db import queries as q

    with session_scope() as s:
        return q.get_images(s, 1, [image_id])[0]


def _worker_pids(data_dir: Path) -> set[int]:
    """Worker processes of this test: registered in its database, or (a worker still
    starting up) running with its data dir in the environment."""
    from db import session_scope
    from db import queries as q

    pids: set[int] = set()
    try:
        with session_scope() as s:
            pids |= {w.pid for w in q.alive_workers(s, max_age_s=3600)}
    except Exception:
        pass
    proc = Path("/proc")
    if proc.is_dir():
        marker = f"OSAD_DATA_DIR={data_dir}".encode()
        for d in proc.iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes()
                if b"osad_core\x00worker" in cmd and marker in (d / "environ").read_bytes().split(b"\x00"):
                    pids.add(int(d.name))
            except OSError:
                continue
    return pids


def _stop_workers(data_dir: Path) -> None:
    """Stop the worker processes the app started for this test (by their pid); call
    after the app itself has stopped, so no new worker can appear."""
    for attempt in range(2):
        for pid in _worker_pids(data_dir):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        time.sleep(0.5)


def test_create_tag_train_and_see_results_in_chromium(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")

    shots_dir = Path(os.environ.get("OSAD_SCREENSHOT_DIR") or tmp_path / "screens")
    shots_dir.mkdir(parents=True, exist_ok=True)
    parts = make_mvtec(tmp_path / "parts", n_train=12, n_test_good=6, n_defect=5)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)  # OSAD_DATA_DIR is this test's own folder (conftest)
    env.update({"OSAD_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"})
    log = open(tmp_path / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        _wait_healthy(url, proc)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(int(os.environ.get("OSAD_BROWSER_TIMEOUT_MS", 90_000)))
            expect = sync_api.expect
            expect.set_options(timeout=int(os.environ.get("OSAD_BROWSER_TIMEOUT_MS", 90_000)))

            def shot(name: str) -> None:
                page.wait_for_timeout(300)
                page.screenshot(path=str(shots_dir / f"{name}.png"), full_page=True)

            def nav(name: str) -> None:
                page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=name).click()
                expect(page.get_by_role("heading", level=1)).to_contain_text(name)

            try:
                _flow(page, expect, url, tmp_path, parts, shot, nav)
            except Exception:
                page.screenshot(path=str(shots_dir / "failure.png"), full_page=True)
                raise
            browser.close()
        print(f"\nscreenshots: {shots_dir}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        _stop_workers(Path(env["OSAD_DATA_DIR"]))


def _flow(page, expect, url, tmp_path, parts, shot, nav) -> None:
    """The inspector's day in one sequence; asserts what is on screen and in the database."""
    # --- Projects: first start offers the demo; bad input changes nothing ----
    page.goto(url)
    expect(page.get_by_role("button", name="Open the ELPV solar cells demo")).to_be_visible()
    form = page.locator('[data-testid="stForm"]').filter(has=page.get_by_label("Folder path"))
    form.get_by_label("Folder path").fill(str(tmp_path / "no-such-folder"))
    form.get_by_role("button", name="Create project").click()
    expect(page.get_by_text("cannot be imported")).to_be_visible()
    shot("01_bad_path")
    form.get_by_label("Folder path").fill(str(parts))
    form.get_by_label("Project name").fill("parts")
    form.get_by_role("button", name="Create project").click()
    expect(page.get_by_text("Created project “parts”")).to_be_visible()
    shot("02_project_created")

    # --- Label: tag with the mouse, then with the keyboard, then undo ---------
    ids = _image_ids(1)
    nav("Label")
    expect(page.locator(".st-key-sel_" + str(ids["test/hole/000.png"]))).to_be_visible()
    for rel in ("test/hole/000.png", "test/hole/001.png"):
        _tick(page, expect, ids[rel])
    expect(page.get_by_text("2 selected")).to_be_visible()
    page.get_by_role("button", name="Use for training").click()
    expect(page.get_by_text("0 selected")).to_be_visible()
    assert _image(ids["test/hole/000.png"]).split == "train"

    # keyboard: tick a normal training image, press 2 (anomaly, last type), then u
    target = ids["train/good/011.png"]
    _settle(page)
    _tick_until(page, expect, target, "1 selected")
    page.locator("h1").click()  # focus off the checkbox, as a user would
    page.keyboard.press("2")
    expect(page.get_by_text("0 selected")).to_be_visible()
    im = _image(target)
    assert (im.label, im.defect_type) == ("anomaly", "hole"), "key 2 did not tag the selection"
    shot("03_label_tagged")
    page.keyboard.press("u")
    expect(page.get_by_text("Undone: 1 image restored")).to_be_visible()
    assert _image(target).label == "normal", "key u did not undo"

    # Shift-click: from the last ticked image to the clicked one, the boxes between included
    page_ids = [int(re.search(r"st-key-sel_(\d+)", c).group(1)) for c in
                page.locator('[class*="st-key-sel_"]').evaluate_all("els => els.map(e => e.className)")[:8]]
    _tick_until(page, expect, page_ids[1], "1 selected")
    _settle(page)
    _box(page, page_ids[5], "label").click(modifiers=["Shift"])
    expect(page.get_by_text("5 selected")).to_be_visible()
    # the count is drawn before the grid in the same run: wait for each box, do not sample once
    for i, want in zip(page_ids[:7], [False] + [True] * 5 + [False]):
        box = expect(_box(page, i))
        box.to_be_checked() if want else box.not_to_be_checked()
    shot("03b_label_shift_click")
    page.get_by_role("button", name="Clear").click()
    expect(page.get_by_text("0 selected")).to_be_visible()

    # large view with the arrow keys
    page.locator(f".st-key-zoom_{ids['test/good/000.png']} button").first.click()
    expect(page.locator(".st-key-large_view")).to_contain_text("test/good/000.png")
    page.locator("h1").click()
    page.keyboard.press("ArrowRight")
    expect(page.locator(".st-key-large_view")).to_contain_text("test/good/001.png")
    shot("04_label_large_view")
    page.keyboard.press("Escape")
    expect(page.locator(".st-key-large_view")).to_have_count(0)

    # new parts arrive unlabelled: the run will score them for the "label next" round
    from db import session_scope
    from db import queries as q

    new_parts = [ids[f"test/good/00{i}.png"] for i in (2, 3, 4, 5)] + [ids["test/scratch/003.png"],
                                                                       ids["test/scratch/004.png"]]
    with session_scope() as s:
        q.set_labels(s, new_parts, "unlabeled", None, author="new parts")

    # --- Train: tiny preset, the app's own worker --------------------------------
    nav("Train")
    page.locator(".st-key-t_method").click()  # DRA: fast at the tiny preset, whatever is registered first
    page.get_by_role("option").filter(has_text=re.compile(r"^DRA —")).click()
    expect(page.get_by_role("combobox", name="Method")).to_have_value(re.compile(r"^DRA —"))
    _settle(page)  # the method's rerun resets the preset: let it end before choosing one
    tiny = page.get_by_role("radio", name="tiny — seconds, for trying the app")
    for _ in range(3):  # a click that lands during a rerun is lost: the quick preset would train for minutes
        _settle(page)
        page.get_by_text("tiny — seconds, for trying the app").click()
        try:
            expect(tiny).to_be_checked(timeout=15_000)
            break
        except AssertionError:
            continue
    expect(tiny).to_be_checked()
    _settle(page)
    expect(page.locator("p").filter(has_text="Plan:")).to_contain_text("2 anomalies (hole)")
    page.locator(".st-key-train_button button").click()
    expect(page.locator(".st-key-job_1")).to_be_visible()
    shot("05_train_queued")
    page.reload()  # a reload (or a closed browser) loses nothing: the job lives in the database
    expect(page.get_by_role("heading", level=1)).to_contain_text("Train")
    expect(page.locator(".st-key-recent_1")).to_be_visible()  # queued, running or already done
    expect(page.locator(".st-key-recent_1")).to_contain_text("done", timeout=240_000)
    shot("06_train_done")

    # --- Results: AUROC, ROC curve, t-SNE -----------------------------------------
    nav("Results")
    metric = page.locator('[data-testid="stMetric"]').filter(has_text="Image AUROC")
    expect(metric).to_be_visible()
    value = metric.locator('[data-testid="stMetricValue"]').inner_text()
    assert 0.0 <= float(value) <= 1.0, value
    roc = page.locator(".st-key-roc .js-plotly-plot")
    expect(roc).to_be_visible()
    expect(roc).to_contain_text("ROC curve")
    expect(roc.locator(".scatterlayer .trace").nth(1)).to_be_attached()  # chance line + the run's curve
    shot("07_results_curves")
    page.get_by_role("tab", name="Embedding map (t-SNE)").click()
    tsne = page.locator(".st-key-tsne_1 .js-plotly-plot")
    expect(tsne).to_be_visible()
    expect(tsne).to_contain_text("t-SNE")
    expect(tsne.locator(".scatterlayer .point").nth(19)).to_be_attached()  # every image of the run (20+)
    tsne.locator(".scatterlayer .point").first.click(force=True)
    heat = page.locator(".st-key-tsne_overlay .js-plotly-plot")  # the clicked image with its heatmap
    expect(heat).to_be_visible()
    expect(heat.locator(".colorbar")).to_be_attached()
    shot("08_results_tsne")
    # resting the pointer on a point previews its image (the listener reports it after 250 ms)
    # (the click above already previewed the clicked point: wait for the hovered one's name)
    preview = page.locator(".st-key-tsne_hover")
    name = None
    for k in (2, 5, 8):
        _settle(page)
        tsne.locator(".scatterlayer .point").nth(k).hover(force=True)
        try:
            label = tsne.locator(".hoverlayer .hovertext")
            expect(label).to_be_visible(timeout=5_000)
            name = (label.locator("tspan.line").first.text_content() or "").strip()  # SVG: the first line
            expect(preview).to_contain_text(name, timeout=15_000)
            break
        except AssertionError:
            name = None
    assert name and name.endswith(".png"), name
    expect(preview.locator("img")).to_be_visible()
    expect(preview).to_contain_text("score")
    shot("08b_results_tsne_hover")
    page.get_by_role("tab", name="Threshold & scores").click()
    expect(page.locator("p").filter(has_text="At this threshold")).to_contain_text("good images")
    shot("09_results_threshold")

    # --- Inspect: heatmap overlay with its colour bar -----------------------------
    nav("Inspect")
    overlay = page.locator(".st-key-ins_overlay .js-plotly-plot")
    expect(overlay).to_be_visible()
    expect(overlay.locator(".colorbar")).to_be_attached()  # the run's fixed colour scale
    expect(overlay.locator(".hm image, .heatmaplayer image").first).to_be_attached()  # the heatmap itself
    expect(page.get_by_text("threshold").first).to_be_visible()
    shot("10_inspect_heatmap")
    page.get_by_role("tab", name="Export").click()
    expect(page.locator(".st-key-onnx_export")).to_be_visible()
    shot("10b_inspect_export")
    page.get_by_role("tab", name="Images by score").click()

    # --- Label next: a round of the labelling loop ---------------------------------
    nav("Label")
    page.locator(".st-key-label_mode").get_by_text("Label next").click()
    progress = page.locator('[data-testid="stProgress"]')
    expect(progress).to_contain_text("0 of 6 labelled")
    view = page.locator(".st-key-large_view")
    expect(view).to_contain_text("Image 1 of 6")
    shot("11_label_next_queue")
    page.locator("h1").click()
    page.keyboard.press("1")  # normal, and on to the next image of the queue
    expect(progress).to_contain_text("1 of 6 labelled")
    expect(view).to_contain_text("Image 2 of 6")
    second = view.locator("strong").first.inner_text()
    page.locator("h1").click()
    page.keyboard.press("2")  # anomaly of the last type used (hole)
    expect(progress).to_contain_text("2 of 6 labelled")
    expect(view).to_contain_text("Image 3 of 6")
    assert _image(ids[second]).label == "anomaly"

    # --- a defect mask drawn on that anomaly -----------------------------------------
    page.locator("h1").click()
    page.keyboard.press("ArrowLeft")
    expect(view).to_contain_text(second)
    view.get_by_text("Draw the defect mask").click()
    canvas = page.locator("canvas.upper-canvas").first
    expect(canvas).to_be_visible()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    for f in (0.4, 0.5, 0.6):
        page.mouse.move(box["x"] + box["width"] * f, box["y"] + box["height"] * f, steps=4)
    page.mouse.up()
    _settle(page)
    shot("12_mask_drawn")
    page.locator(".st-key-mask_save button").click()
    expect(page.get_by_text("Mask saved")).to_be_visible()
    drawn = _image(ids[second]).mask_path
    assert drawn and "masks" in drawn, drawn
    from PIL import Image as PILImage
    import numpy as np

    m = np.asarray(PILImage.open(drawn)) > 127
    assert 0 < m.mean() < 0.5 and m.shape == (48, 48), m.mean()  # the stroke, at the image's size
    shot("13_mask_saved")

    # --- retrain with these labels; the rounds chart shows both rounds ------------------
    page.get_by_role("button", name="Retrain with these").first.click()
    expect(page.get_by_text("Run 2 queued")).to_be_visible()
    nav("Train")
    expect(page.locator(".st-key-recent_2")).to_contain_text("done", timeout=240_000)
    nav("Results")
    page.get_by_role("tab", name="Labelling rounds").click()
    rounds = page.locator(".st-key-rounds_fig .js-plotly-plot")
    expect(rounds).to_contain_text("AUROC per labelling round")
    shot("14_results_rounds")


def test_login_survives_a_reload_and_logout_forgets_it_in_chromium(tmp_path):
    """Login on: only the login form, a wrong password refused, the session kept across a
    reload (signed cookie), logout back to the form, also after a reload."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from db import auth

    auth.create_user("alice", "admin-pass-1", "admin")
    shots_dir = Path(os.environ.get("OSAD_SCREENSHOT_DIR") or tmp_path / "screens")
    shots_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, OSAD_OFFLINE="1", OSAD_AUTOSTART_WORKER="0", PYTHONUNBUFFERED="1")
    log = open(tmp_path / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        _wait_healthy(url, proc)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(60_000)
            expect = sync_api.expect
            expect.set_options(timeout=60_000)
            try:
                page.goto(url)
                expect(page.get_by_role("button", name="Log in")).to_be_visible()
                expect(page.locator('[data-testid="stSidebarNav"]')).to_have_count(0)
                page.screenshot(path=str(shots_dir / "login_01_form.png"))
                page.get_by_label("Username", exact=True).fill("alice")
                page.get_by_label("Password", exact=True).fill("wrong-password")
                page.get_by_role("button", name="Log in").click()
                expect(page.get_by_text("Wrong username or password")).to_be_visible()
                page.get_by_label("Password", exact=True).fill("admin-pass-1")
                page.get_by_role("button", name="Log in").click()
                expect(page.get_by_role("heading", level=1)).to_contain_text("Projects")
                expect(page.get_by_text("alice · admin")).to_be_visible()
                expect(page.locator('[data-testid="stSidebarNav"]')).to_contain_text("Users")
                _settle(page)
                page.screenshot(path=str(shots_dir / "login_02_in.png"))
                page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name="Users").click()
                expect(page.get_by_role("heading", level=1)).to_contain_text("Users")
                expect(page.locator('[data-testid="stDataFrame"]')).to_be_visible()
                expect(page.get_by_role("button", name="Add user")).to_be_visible()
                _settle(page)
                page.wait_for_timeout(1500)  # the table and the select boxes draw after the run ends
                page.screenshot(path=str(shots_dir / "login_03_users.png"), full_page=True)
                page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name="Projects").click()
                expect(page.get_by_role("heading", level=1)).to_contain_text("Projects")
                page.reload()
                expect(page.get_by_role("heading", level=1)).to_contain_text("Projects")
                expect(page.get_by_text("alice · admin")).to_be_visible()
                cookies = {c["name"]: c for c in page.context.cookies()}
                assert cookies["osad_session"]["sameSite"] == "Strict"
                page.get_by_role("button", name="Log out").click()
                expect(page.get_by_role("button", name="Log in")).to_be_visible()
                _settle(page)
                page.reload()
                expect(page.get_by_role("button", name="Log in")).to_be_visible()
                assert "osad_session" not in {c["name"] for c in page.context.cookies()}
            except Exception:
                page.screenshot(path=str(shots_dir / "login_failure.png"), full_page=True)
                raise
            browser.close()
        print(f"\nscreenshots: {shots_dir}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert "login: user 'alice' (admin)" in (tmp_path / "streamlit.log").read_text()
