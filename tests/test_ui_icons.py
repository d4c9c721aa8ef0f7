"""The app's icons are Material Symbols (``:material/name:``), never emoji: emoji render
as empty boxes on machines without an emoji font (e.g. headless Chromium on Debian)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UI_SOURCES = [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py")), *sorted((ROOT / "ui").glob("*.py"))]

# pictographs, dingbats, misc symbols/technical, arrows-as-emoji, geometric shapes,
# regional indicators, the emoji variation selector and the ZWJ
EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2300-\u23FF\u2B00-\u2BFF\u25A0-\u25FF"
                   "\u2139\u3030\u303D\uFE0F\u200D]")
MATERIAL = re.compile(r":material/([a-z0-9_]+):")


def test_no_emoji_in_ui_sources():
    hits = []
    for path in UI_SOURCES:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for ch in EMOJI.findall(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: U+{ord(ch):04X} in {line.strip()[:80]}")
    assert not hits, "emoji in UI sources (use :material/...: icons):\n" + "\n".join(hits)


def test_pattern_catches_the_emoji_it_replaced():
    for ch in "📁🏷️🧠📈🔬👥⬅️➡️🚨✅↩️ℹ️🟢🔴⚠️🔍◀▶☀️🗑️🔁🚀⚙️⏹️⏳❌⚪🔒👤➕":
        if ch in "\u2190\u2192\u21a9":  # plain arrows are text; their emoji form carries U+FE0F
            continue
        assert EMOJI.search(ch), f"U+{ord(ch):04X}"


def test_material_icons_are_used_everywhere():
    names = {m for path in UI_SOURCES for m in MATERIAL.findall(path.read_text(encoding="utf-8"))}
    # the navigation and the main actions all carry an icon
    assert {"folder", "label", "model_training", "monitoring", "biotech", "undo", "warning"} <= names
