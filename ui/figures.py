"""Plotly figures of OSAD Studio, built from what the database stores.

Pure functions (no Streamlit): the pages pass rows read through ``db.queries`` and
draw the returned figures; tests build them directly.
"""
from __future__ import annotations

import base64
import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from .thumbs import png_bytes

COLORS = {
    "normal": "#2a9d8f",
    "anomaly": "#e4572e",
    "unlabeled": "#9aa0a6",
    "seen": "#f4a261",
    "unseen": "#7b2cbf",
}
GROUP_COLORS = {
    "normal": COLORS["normal"],
    "anomaly": COLORS["anomaly"],
    "unlabelled": COLORS["unlabeled"],
    "anomaly · seen type": COLORS["seen"],
    "anomaly · unseen type": COLORS["unseen"],
}
ROLE_NAMES = {
    "train_normal": "training (normal)",
    "train_anomaly": "training (labelled anomaly)",
    "calibration": "held-out normal (operating point)",
    "test": "held out (test)",
    "scored": "unlabelled (scored)",
}
ROLE_SYMBOLS = {
    "training (normal)": "circle-open",
    "training (labelled anomaly)": "diamond",
    "held-out normal (operating point)": "square-open",
    "held out (test)": "circle",
    "unlabelled (scored)": "x-thin-open",
}
# open symbols vanish at the small sizes of a dense map: filled ones there
DENSE_ROLE_SYMBOLS = {
    "training (normal)": "circle",
    "training (labelled anomaly)": "diamond",
    "held-out normal (operating point)": "square",
    "held out (test)": "triangle-up",
    "unlabelled (scored)": "x",
}
HEATMAP_SCALE = "Turbo"
_LAYOUT = dict(margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{nd}f}"


def scores_frame(rows: Sequence[dict]) -> pd.DataFrame:
    """``queries.run_scores`` rows as a frame with display columns added."""
    df = pd.DataFrame(list(rows))
    if df.empty:
        return pd.DataFrame(columns=["image_id", "rel_path", "score", "role", "label_at_run",
                                     "defect_type_at_run", "seen", "tsne_x", "tsne_y", "group", "role_name",
                                     "defect", "label"])
    df["role_name"] = df["role"].map(ROLE_NAMES).fillna(df["role"])
    lab = df["label_at_run"].replace({"unlabeled": "unlabelled"})
    group = lab.copy()
    an = df["label_at_run"] == "anomaly"
    seen = df["seen"].astype("boolean")
    group[an & (seen == True)] = "anomaly · seen type"  # noqa: E712
    group[an & (seen == False)] = "anomaly · unseen type"  # noqa: E712
    df["label_name"] = lab
    df["group"] = group
    df["defect"] = np.where(an, df["defect_type_at_run"].fillna("anomaly"), lab)
    return df


def evaluation_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Held-out labelled images of a run: the images its metrics were measured on."""
    if df.empty:
        return df
    return df[(df["role"] == "test") & df["label_at_run"].isin(["normal", "anomaly"])]


# --- curves -------------------------------------------------------------------------------


def _unit_square(fig: go.Figure, legend_right: bool, y_max: float) -> go.Figure:
    """Axes over [0, 1] and the legend in a bottom corner, shared by the ROC and PR plots."""
    fig.update_layout(legend=dict(orientation="v", x=0.98 if legend_right else 0.02,
                                  xanchor="right" if legend_right else "left", y=0.03, yanchor="bottom",
                                  bgcolor="rgba(255,255,255,0.8)"))
    fig.update_xaxes(range=[-0.01, 1.01])
    fig.update_yaxes(range=[-0.01, y_max])
    return fig


def roc_figure(curves: Sequence[tuple[str, dict]], threshold: float | None = None,
               reference: float | None = None) -> go.Figure:
    """ROC curves (one per ``(name, curve)``); hover shows threshold, TPR and FPR.

    With one curve: a star at the run's operating point ``threshold`` and an open circle at
    ``reference`` (the best-F1 point, chosen on these very test labels)."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color="#bbb"),
                             name="chance", hoverinfo="skip"))
    for name, c in curves:
        thr = [t if t is not None else float("nan") for t in c.get("thresholds", [])]
        fig.add_trace(go.Scatter(
            x=c["x"], y=c["y"], mode="lines+markers", name=name, marker=dict(size=4),
            customdata=thr, line=dict(shape="hv"),
            hovertemplate="threshold %{customdata:.4f}<br>TPR %{y:.3f}<br>FPR %{x:.3f}<extra>%{fullData.name}</extra>",
        ))
        if len(curves) != 1 or not thr:
            continue
        arr = np.asarray(thr, dtype=float)
        for label, t, symbol in (("operating point", threshold, "star"),
                                 ("best F1 on test labels (reference)", reference, "circle-open")):
            ok = np.where(np.isfinite(arr) & (arr >= t))[0] if t is not None else []
            if len(ok):
                i = int(ok[np.argmin(arr[ok])])
                fig.add_trace(go.Scatter(x=[c["x"][i]], y=[c["y"][i]], mode="markers", name=label,
                                         marker=dict(size=12, symbol=symbol, color="#111"),
                                         hovertemplate=f"{label} %{{customdata:.4f}}<extra></extra>",
                                         customdata=[t]))
    fig.update_layout(title="ROC curve (held-out labelled images)",
                      xaxis_title="false positive rate (good images rejected)",
                      yaxis_title="true positive rate (defects caught)", height=400, **_LAYOUT)
    return _unit_square(fig, legend_right=True, y_max=1.01)


def pr_figure(curves: Sequence[tuple[str, dict]], base_rates: Sequence[float] = ()) -> go.Figure:
    fig = go.Figure()
    for name, c in curves:
        thr = [t if t is not None else float("nan") for t in c.get("thresholds", [])]
        fig.add_trace(go.Scatter(
            x=c["x"], y=c["y"], mode="lines", name=name, customdata=thr,
            hovertemplate=("threshold %{customdata:.4f}<br>precision %{y:.3f}<br>recall %{x:.3f}"
                           "<extra>%{fullData.name}</extra>"),
        ))
    for r in base_rates[:1]:
        fig.add_hline(y=r, line_dash="dash", line_color="#bbb", annotation_text="share of defects (chance)")
    fig.update_layout(title="Precision–recall curve", xaxis_title="recall (defects caught)",
                      yaxis_title="precision (flagged images that are defects)", height=400, **_LAYOUT)
    return _unit_square(fig, legend_right=False, y_max=1.05)


# --- scores ---------------------------------------------------------------------------------


def score_histogram(df: pd.DataFrame, by: str = "label_name", threshold: float | None = None,
                    title: str = "Score distribution of the held-out images",
                    reference: float | None = None, histnorm: str | None = None) -> go.Figure:
    colors = dict(GROUP_COLORS)
    fig = px.histogram(df, x="score", color=by, barmode="overlay", opacity=0.65, nbins=40, histnorm=histnorm,
                       color_discrete_map=colors, hover_data=["rel_path"] if len(df) < 3000 else None)
    if threshold is not None:
        fig.add_vline(x=threshold, line_dash="dash", line_color="#111", annotation_text="threshold")
    if reference is not None:
        # above the bars, left of its line (the threshold's label sits right of its own)
        fig.add_vline(x=reference, line_dash="dot", line_color="#888", annotation_text="best F1 (reference)",
                      annotation_position="top left")
    fig.update_layout(title=title, xaxis_title="anomaly score",
                      yaxis_title="share of images" if histnorm else "images", height=340,
                      legend_title_text="", **_LAYOUT)
    fig.update_layout(legend=dict(x=1, xanchor="right"))  # right of the title, not over it
    return fig


def group_name(label_at_run: str, defect_type_at_run: str | None, by: str = "label_name") -> str:
    """The legend entry of an image in a histogram: its label, or its defect type."""
    lab = "unlabelled" if label_at_run == "unlabeled" else label_at_run
    if by == "defect" and label_at_run == "anomaly":
        return defect_type_at_run or "anomaly"
    return lab


def binned_histogram(bins: Sequence[dict], by: str = "label_name", threshold: float | None = None,
                     title: str = "Score distribution of the held-out images",
                     reference: float | None = None) -> go.Figure:
    """The score histogram from counts made in the database (``db.score_views.
    evaluation_histogram``: one row per bin and group with ``x0``, ``x1``, ``n``), drawn
    like :func:`score_histogram`: the same bars for 100 or 100,000 images."""
    counts: dict[str, dict[tuple[float, float], int]] = {}
    for b in bins:
        g = group_name(b["label_at_run"], b["defect_type_at_run"], by)
        key = (b["x0"], b["x1"])
        counts.setdefault(g, {})[key] = counts.get(g, {}).get(key, 0) + b["n"]
    fig = go.Figure()
    order = [g for g in GROUP_ORDER if g in counts] + sorted(g for g in counts if g not in GROUP_ORDER)
    palette = px.colors.qualitative.Plotly
    for k, g in enumerate(order):
        edges = sorted(counts[g])
        fig.add_trace(go.Bar(
            x=[(a + b) / 2 for a, b in edges], y=[counts[g][e] for e in edges], width=[b - a for a, b in edges],
            name=g, opacity=0.65, marker_color=GROUP_COLORS.get(g, palette[k % len(palette)]),
            customdata=[[a, b] for a, b in edges],
            hovertemplate="%{customdata[0]:.4f} – %{customdata[1]:.4f}: %{y} images<extra>%{fullData.name}</extra>"))
    fig.update_layout(barmode="overlay", bargap=0)
    if threshold is not None:
        fig.add_vline(x=threshold, line_dash="dash", line_color="#111", annotation_text="threshold")
    if reference is not None:
        fig.add_vline(x=reference, line_dash="dot", line_color="#888", annotation_text="best F1 (reference)",
                      annotation_position="top left")
    fig.update_layout(title=title, xaxis_title="anomaly score", yaxis_title="images", height=340,
                      legend_title_text="", **_LAYOUT)
    fig.update_layout(legend=dict(x=1, xanchor="right"))
    return fig


def threshold_counts(df: pd.DataFrame, threshold: float) -> dict[str, int]:
    """Confusion counts at ``threshold`` (score >= threshold flags an image)."""
    flagged = df["score"] >= threshold
    an = df["label_at_run"] == "anomaly"
    return {
        "tn": int((~flagged & ~an).sum()), "fp": int((flagged & ~an).sum()),
        "fn": int((~flagged & an).sum()), "tp": int((flagged & an).sum()),
    }


def _plural(n: int, one: str, many: str) -> str:
    return one if n == 1 else many


def threshold_sentence(c: dict[str, int]) -> str:
    """"At this threshold 3 of 120 good images are rejected and 1 of 40 defects is missed." """
    good, bad = c["tn"] + c["fp"], c["tp"] + c["fn"]
    return (f"At this threshold **{c['fp']} of {good}** good images "
            f"{_plural(c['fp'], 'is', 'are')} rejected and **{c['fn']} of {bad}** "
            f"{_plural(bad, 'defect', 'defects')} {_plural(c['fn'], 'is', 'are')} missed.")


def confusion_figure(c: dict[str, int]) -> go.Figure:
    text = [[f"{c['tn']}<br>good, passed", f"{c['fp']}<br>good, rejected"],
            [f"{c['fn']}<br>defect, missed", f"{c['tp']}<br>defect, caught"]]
    fig = go.Figure(go.Heatmap(
        z=[[0, 1], [1, 0]], x=["passed (normal)", "flagged (anomaly)"], y=["good", "defect"],
        text=text, texttemplate="%{text}", showscale=False, hoverinfo="skip",
        colorscale=[[0, "#e8f4f1"], [1, "#fbe3dc"]], textfont=dict(size=15),
    ))
    fig.update_yaxes(autorange="reversed", title="truth")
    fig.update_xaxes(title="verdict at this threshold", side="top")
    fig.update_layout(height=250, margin=dict(l=10, r=10, t=50, b=10))
    return fig


# --- embeddings -----------------------------------------------------------------------------

TSNE_COLOR_BY = {
    "label": "label_name",
    "defect type": "defect",
    "seen / unseen defect type": "group",
    "score": "score",
    "role in the run": "role_name",
}


# Draw order on the map: the many unlabelled and normal points first, the few anomalies on
# top, so a labelled defect is never buried under thousands of scored images.
GROUP_ORDER = ["unlabelled", "normal", "anomaly", "anomaly · seen type", "anomaly · unseen type"]
DENSE_MAP = 2000  # from here on the map draws smaller points over a density layer


def point_text(defect: str, role_name: str) -> str:
    """"crack · held out (test)"; the role alone where it already says the label."""
    return role_name if str(defect) in str(role_name) else f"{defect} · {role_name}"


def tsne_marker_size(n: int) -> int:
    return 8 if n <= 1500 else 6 if n <= 5000 else 5


DENSITY_BINS = 80  # per side of the density layer's grid


def density_grid(x, y, bins: int = DENSITY_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x centres, y centres, counts[y, x]) of points on a ``bins`` × ``bins`` grid."""
    z, xe, ye = np.histogram2d(np.asarray(x, float), np.asarray(y, float), bins=bins)
    return (xe[:-1] + xe[1:]) / 2, (ye[:-1] + ye[1:]) / 2, z.T


def tsne_figure(df: pd.DataFrame, color_by: str = "seen / unseen defect type",
                density: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, total: int | None = None,
                highlight: pd.DataFrame | None = None) -> go.Figure:
    """t-SNE map of the run's embeddings; every point carries its image id (customdata).

    Legible at 10,000 points: WebGL markers that shrink with the count, a density layer
    (contours of a 2-D histogram of all points, binned here so the page sends a grid,
    not the points) underneath from ``DENSE_MAP`` points on, anomalies drawn last. Every
    drawn point stays clickable and selectable with box or lasso. When ``df`` is a
    sample, ``density`` is the grid of every point of the map (:func:`density_grid`'s
    form, counted by the database) and ``total`` their number; ``highlight`` rows (a
    found image) are marked with a star on top."""
    pts = df.dropna(subset=["tsne_x", "tsne_y"]).copy()
    pts["what"] = [point_text(d, r) for d, r in zip(pts["defect"], pts["role_name"])]
    n = len(pts)
    total = n if total is None else int(total)
    col = TSNE_COLOR_BY.get(color_by, "group")
    kwargs: dict[str, Any] = {}
    if col == "score":
        kwargs["color_continuous_scale"] = "Turbo"
        pts = pts.sort_values("score")  # the highest scores on top
    elif col in ("group", "label_name"):
        kwargs["color_discrete_map"] = GROUP_COLORS
        kwargs["category_orders"] = {col: [g for g in GROUP_ORDER if g in set(pts[col])]}
    fig = px.scatter(
        pts, x="tsne_x", y="tsne_y", color=col, symbol="role_name",
        symbol_map=DENSE_ROLE_SYMBOLS if n > DENSE_MAP else ROLE_SYMBOLS,
        custom_data=["image_id", "rel_path", "score", "what"],
        render_mode="webgl" if n > 1500 else "svg", **kwargs,
    )
    fig.update_traces(
        marker=dict(size=tsne_marker_size(n), line=dict(width=0.5 if n <= 1500 else 0, color="#333"),
                    opacity=1.0 if n <= DENSE_MAP else 0.75),
        hovertemplate="<b>%{customdata[1]}</b><br>%{customdata[3]}<br>score %{customdata[2]:.3f}<extra></extra>",
    )
    if total > DENSE_MAP:
        xc, yc, z = density if density is not None else density_grid(pts["tsne_x"], pts["tsne_y"])
        fig.add_trace(go.Contour(
            x=xc, y=yc, z=z, name=f"density of all {total:,} points",
            ncontours=12, showscale=False, colorscale=[[0, "rgba(255,255,255,0)"], [1, "rgba(60,60,60,0.35)"]],
            contours=dict(coloring="fill"), line=dict(width=0), hoverinfo="skip", showlegend=True))
        fig.data = (fig.data[-1],) + fig.data[:-1]  # underneath the points
    if highlight is not None and len(highlight):
        # WebGL points are drawn above every SVG trace: the star must be WebGL too to show
        star = go.Scattergl if n > 1500 else go.Scatter
        fig.add_trace(star(
            x=highlight["tsne_x"], y=highlight["tsne_y"], mode="markers", name="found",
            marker=dict(size=16, symbol="star", color="#ffd60a", line=dict(width=1.5, color="#111")),
            customdata=np.stack([highlight["image_id"], highlight["rel_path"], highlight["score"],
                                 [point_text(d, r) for d, r in zip(highlight["defect"], highlight["role_name"])]],
                                axis=1),
            hovertemplate="<b>%{customdata[1]}</b><br>%{customdata[3]}<extra>found</extra>"))
    if n < total:
        title = f"t-SNE map · a sample of {n:,} of {total:,} images, over the density of all"
    else:
        title = "t-SNE of the learned embeddings" + (f" · {n:,} images, shaded by density" if n > DENSE_MAP else "")
    fig.update_layout(title=title, xaxis_title="", yaxis_title="", height=560,
                      legend_title_text="", clickmode="event+select", dragmode="pan", **_LAYOUT)
    fig.update_layout(legend=dict(orientation="h", y=-0.02, x=0, yanchor="top", font=dict(size=11)),
                      margin=dict(l=10, r=10, t=40, b=10))
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return fig


# --- heatmaps -------------------------------------------------------------------------------


def overlay_figure(image: np.ndarray, heat: np.ndarray | None, vmin: float, vmax: float,
                   opacity: float = 0.45, title: str = "", height: int = 460) -> go.Figure:
    """The image with its anomaly map on top, on the run's fixed colour range, and a
    colour bar. ``image`` is RGB uint8 (H, W, 3); ``heat`` any (h, w) map."""
    h_img, w_img = image.shape[:2]
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    fig = go.Figure(go.Image(source=uri, hoverinfo="skip"))
    if heat is not None and opacity > 0:
        hh, hw = heat.shape
        fig.add_trace(go.Heatmap(
            z=heat, x0=w_img / hw / 2, dx=w_img / hw, y0=h_img / hh / 2, dy=h_img / hh,
            zmin=vmin, zmax=vmax, colorscale=HEATMAP_SCALE, opacity=opacity, zsmooth="best",
            colorbar=dict(title=dict(text="anomaly", side="right"), thickness=14),
            hovertemplate="map value %{z:.3f}<extra></extra>",
        ))
    fig.update_xaxes(visible=False, range=[0, w_img])
    fig.update_yaxes(visible=False, range=[h_img, 0], scaleanchor="x")
    fig.update_layout(title=title, height=height, margin=dict(l=0, r=0, t=40 if title else 0, b=0),
                      dragmode=False)
    return fig


def loss_sparkline(log: Sequence[dict], height: int = 120) -> go.Figure:
    """Loss over time. A finished run logs its per-epoch history (``step`` None) next to
    the live per-epoch points the worker wrote while training; draw one series."""
    final = [r for r in log if r.get("step") is None]
    pts = final if len(final) >= 2 else list(log)
    pts = sorted(pts, key=lambda r: (r.get("elapsed_s") is None, r.get("elapsed_s") or 0))
    xs = [r["elapsed_s"] if r.get("elapsed_s") is not None else i for i, r in enumerate(pts)]
    ys = [r["loss"] for r in pts]
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines+markers", line=dict(color="#264653"),
                               hovertemplate="%{x:.0f} s · loss %{y:.4f}<extra></extra>"))
    fig.update_layout(height=height, margin=dict(l=0, r=0, t=20, b=0), title=dict(text="loss", font=dict(size=12)),
                      xaxis=dict(title="", ticksuffix=" s"), yaxis=dict(title=""), showlegend=False)
    return fig


def metric_bars(rows: Sequence[dict]) -> go.Figure:
    """Grouped bars of AUROC / seen / unseen per run for the comparison view."""
    names = {"image_auroc": "AUROC", "image_auroc_seen": "AUROC seen types", "image_auroc_unseen": "AUROC unseen types",
             "image_aupr": "AUPR"}
    fig = go.Figure()
    for key, label in names.items():
        fig.add_trace(go.Bar(x=[r["run"] for r in rows], y=[r.get(key) for r in rows], name=label,
                             text=[_fmt(r.get(key)) for r in rows], textposition="outside"))
    fig.update_layout(barmode="group", height=400, yaxis=dict(range=[0, 1.1], title=""),
                      title="Runs side by side", **_LAYOUT)
    fig.update_layout(legend=dict(orientation="h", y=-0.12, yanchor="top", x=0))
    return fig


def rounds_figure(rows: Sequence[dict]) -> go.Figure:
    """AUROC per labelling round (overall, seen and unseen defect types)."""
    names = {"image_auroc": ("AUROC", "#264653"), "image_auroc_seen": ("AUROC seen types", COLORS["seen"]),
             "image_auroc_unseen": ("AUROC unseen types", COLORS["unseen"])}
    fig = go.Figure()
    x = [r["round"] for r in rows]
    extra = [[r["id"], r["labelled"], r["anomalies"], r["n_test"]] for r in rows]
    for key, (label, color) in names.items():
        y = [r.get(key) for r in rows]
        if all(v is None for v in y):
            continue
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines+markers", name=label, line=dict(color=color), customdata=extra,
            hovertemplate=("round %{x} (run %{customdata[0]})<br>%{y:.3f}<br>trained on %{customdata[1]} labelled "
                           "images, %{customdata[2]} anomalies<br>%{customdata[3]} held-out images"
                           "<extra>%{fullData.name}</extra>")))
    fig.update_layout(height=380, title="AUROC per labelling round (same held-out images)",
                      xaxis=dict(title="round", dtick=1), yaxis=dict(title="", range=[0, 1.02]), **_LAYOUT)
    fig.update_layout(legend=dict(orientation="h", y=-0.22, yanchor="top", x=0))  # clear of the title
    return fig
