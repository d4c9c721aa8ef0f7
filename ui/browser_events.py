"""Browser events that Streamlit's own widgets do not report: a Shift-click on a grid
checkbox and the point under the pointer on a Plotly chart.

Both are ``st.components.v2`` components: a few lines of JavaScript kept here, run in the
app's own page (no iframe, no build step, nothing fetched), that send one trigger value
back. A v1 component would live in an iframe that cannot see the grid's clicks or the
chart's hover events; third-party keyboard components report key presses, not the
modifier held during a click.
"""
from __future__ import annotations

import streamlit as st

# A Shift-click on an image's checkbox (``.st-key-sel_<image id>``) is taken from the
# checkbox, so it does not toggle, and sent as the image id: the page selects the range.
_SHIFT_CLICK_JS = """
export default function (component) {
  const { setTriggerValue } = component;
  const imageOf = (e) => {
    const box = e.target.closest && e.target.closest('[class*="st-key-sel_"]');
    const m = box && box.className.match(/st-key-sel_(\\d+)/);
    return m ? Number(m[1]) : null;
  };
  const onMouseDown = (e) => { if (e.shiftKey && imageOf(e) !== null) e.preventDefault(); };  // no text selection
  const onClick = (e) => {
    if (!e.shiftKey) return;
    const id = imageOf(e);
    if (id === null) return;
    e.preventDefault();
    e.stopPropagation();
    setTriggerValue("shift_click", id);
  };
  document.addEventListener("mousedown", onMouseDown, true);
  document.addEventListener("click", onClick, true);
  return () => {
    document.removeEventListener("mousedown", onMouseDown, true);
    document.removeEventListener("click", onClick, true);
  };
}
"""

# The chart's ``plotly_hover`` event, debounced: once the pointer rests 250 ms on a point,
# its first customdata value (the image id) is sent. The chart may be redrawn, so the
# listener is attached again to whatever element and event emitter hold it now.
_PLOT_HOVER_JS = """
export default function (component) {
  const { data, setTriggerValue } = component;
  let timer = null, last = null, bound = null, boundEvents = null;
  const onHover = (ev) => {
    const p = ev && ev.points && ev.points[0];
    if (!p || !p.customdata) return;
    const id = Number(Array.isArray(p.customdata) ? p.customdata[0] : p.customdata);
    clearTimeout(timer);
    timer = setTimeout(() => { if (id !== last) { last = id; setTriggerValue("hover", id); } }, 250);
  };
  const bind = () => {
    const gd = document.querySelector(data.selector + " .js-plotly-plot");
    // a redraw (after a click or a selection) purges the chart's listeners and gives it a
    // new event emitter (gd._ev): bind again whenever the element or its emitter changed
    if (gd && typeof gd.on === "function" && (gd !== bound || gd._ev !== boundEvents)) {
      gd.on("plotly_hover", onHover);
      bound = gd;
      boundEvents = gd._ev;
    }
  };
  bind();
  const every = setInterval(bind, 500);
  return () => {
    clearInterval(every);
    clearTimeout(timer);
    if (bound && bound.removeListener) bound.removeListener("plotly_hover", onHover);
  };
}
"""

_shift_click = st.components.v2.component("osad_shift_click", js=_SHIFT_CLICK_JS)
_plot_hover = st.components.v2.component("osad_plot_hover", js=_PLOT_HOVER_JS)


def _ignore() -> None:
    """Trigger values are read from the component's result; the callback only registers them."""


def shift_click(key: str = "osad_event_shift_click") -> int | None:
    """The image id whose grid checkbox was Shift-clicked in this run, else None."""
    res = _shift_click(key=key, on_shift_click_change=_ignore, height=0)
    value = getattr(res, "shift_click", None)
    return int(value) if value is not None else None


def plot_hover(chart_key: str) -> int | None:
    """The image id under the pointer on the chart ``st.plotly_chart(key=chart_key)`` when the
    pointer came to rest there (once per new point), else None."""
    res = _plot_hover(key=f"osad_event_hover_{chart_key}", data={"selector": f".st-key-{chart_key}"}, on_hover_change=_ignore, height=0)
    value = getattr(res, "hover", None)
    return int(value) if value is not None else None
