"""Inline SVG charts for clinic reports: no script, no fonts fetched, readable without colour.

Every chart carries a <title> and <desc> (screen readers), direct value labels, and distinguishes
series by shape or hatching as well as by colour, so it survives greyscale printing. Suppressed
values are drawn as an outlined placeholder with the letter "s", never as a bar of any height.
Ids inside a chart are prefixed with the chart id, because several charts share one HTML document.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from alliance.report.suppress import Shown

INK = "#1f2933"
MUTED = "#6b7785"
ACCENT = "#1d5fa8"
WARN = "#b5471b"
FONT = "font-family='system-ui, -apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif'"


def _fmt(v: float | int | None, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def _open(cid: str, title: str, desc: str, width: int, height: int) -> list[str]:
    return [
        f"<svg xmlns='http://www.w3.org/2000/svg' id='{cid}' class='chart' role='img' "
        f"viewBox='0 0 {width} {height}' width='100%' style='max-width:{width}px' "
        f"aria-labelledby='{cid}-t {cid}-d' {FONT} font-size='12' fill='{INK}'>",
        f"<title id='{cid}-t'>{escape(title)}</title>",
        f"<desc id='{cid}-d'>{escape(desc)}</desc>",
        "<defs>",
        f"<pattern id='{cid}-hatch' width='6' height='6' patternUnits='userSpaceOnUse' "
        f"patternTransform='rotate(45)'><rect width='6' height='6' fill='#f6d8cc'/>"
        f"<line x1='0' y1='0' x2='0' y2='6' stroke='{WARN}' stroke-width='2.5'/></pattern>",
        f"<pattern id='{cid}-dots' width='6' height='6' patternUnits='userSpaceOnUse'>"
        f"<rect width='6' height='6' fill='#d7e5f5'/><circle cx='3' cy='3' r='1.3' fill='{ACCENT}'/>"
        "</pattern>",
        f"<pattern id='{cid}-grid' width='6' height='6' patternUnits='userSpaceOnUse'>"
        f"<rect width='6' height='6' fill='#eceff3'/><path d='M0 0H6M0 0V6' stroke='{MUTED}' "
        "stroke-width='1'/></pattern>",
        "</defs>",
    ]


def _suppressed_box(x: float, y: float, w: float, h: float) -> str:
    return (
        f"<rect x='{x:.1f}' y='{y:.1f}' width='{w:.1f}' height='{h:.1f}' fill='none' "
        f"stroke='{MUTED}' stroke-dasharray='3 2'/>"
        f"<text x='{x + w / 2:.1f}' y='{y + h / 2 + 4:.1f}' text-anchor='middle' "
        f"fill='{MUTED}' font-style='italic'>s</text>"
    )


FILLS = {"solid": ACCENT, "hatch": "hatch", "dots": "dots", "grid": "grid", "plain": "#9aa5b1"}


def _fill(cid: str, style: str) -> str:
    f = FILLS.get(style, style)
    return f"url(#{cid}-{f})" if f in ("hatch", "dots", "grid") else f


def line_trend(
    cid: str,
    title: str,
    desc: str,
    points: Sequence[tuple[str, Shown | None]],
    y_min: float,
    y_max: float,
    reference: float | None = None,
    reference_label: str = "",
) -> str:
    """A monthly trend line with a circle marker and value label at every shown month."""
    width, height, left, right, top, bottom = 640, 240, 44, 16, 16, 40
    pw, ph = width - left - right, height - top - bottom
    n = max(len(points), 1)
    step = pw / max(n - 1, 1)

    def y(v: float) -> float:
        v = min(max(v, y_min), y_max)
        return top + ph * (1 - (v - y_min) / (y_max - y_min))

    out = _open(cid, title, desc, width, height)
    for frac in (0, 0.25, 0.5, 0.75, 1):
        v = y_min + frac * (y_max - y_min)
        out.append(f"<line x1='{left}' x2='{width - right}' y1='{y(v):.1f}' y2='{y(v):.1f}' "
                   "stroke='#dfe3e8'/>")
        out.append(f"<text x='{left - 6}' y='{y(v) + 4:.1f}' text-anchor='end' "
                   f"fill='{MUTED}'>{_fmt(v, 0)}</text>")
    if reference is not None:
        out.append(f"<line x1='{left}' x2='{width - right}' y1='{y(reference):.1f}' "
                   f"y2='{y(reference):.1f}' stroke='{WARN}' stroke-dasharray='6 3' stroke-width='1.5'/>")
        out.append(f"<text x='{width - right}' y='{y(reference) - 5:.1f}' text-anchor='end' "
                   f"fill='{WARN}'>{escape(reference_label)}</text>")
    segment: list[str] = []
    segments: list[list[str]] = []
    for i, (_, p) in enumerate(points):
        if p is None or p.shown is None:
            if segment:
                segments.append(segment)
            segment = []
            continue
        segment.append(f"{left + i * step:.1f},{y(float(p.shown)):.1f}")
    if segment:
        segments.append(segment)
    for seg in segments:
        out.append(f"<polyline points='{' '.join(seg)}' fill='none' stroke='{ACCENT}' "
                   "stroke-width='2.5'/>")
    for i, (label, p) in enumerate(points):
        x = left + i * step
        out.append(f"<text x='{x:.1f}' y='{height - bottom + 16}' text-anchor='middle' "
                   f"fill='{MUTED}' font-size='10'>{escape(label)}</text>")
        if p is None or p.value is None:
            out.append(f"<text x='{x:.1f}' y='{top + ph - 4}' text-anchor='middle' "
                       f"fill='{MUTED}' font-size='10'>no data</text>")
        elif p.is_suppressed:
            out.append(_suppressed_box(x - 7, top + ph / 2 - 9, 14, 18))
        else:
            yy = y(float(p.value))
            out.append(f"<circle cx='{x:.1f}' cy='{yy:.1f}' r='4.5' fill='white' "
                       f"stroke='{ACCENT}' stroke-width='2.5'/>")
            out.append(f"<text x='{x:.1f}' y='{yy - 9:.1f}' text-anchor='middle' "
                       f"font-size='10'>{_fmt(p.value)}</text>")
    out.append("</svg>")
    return "\n".join(out)


@dataclass(frozen=True)
class Bar:
    """One bar: label, displayed value (with suppression), text printed on it, fill style."""

    label: str
    value: Shown
    text: str
    style: str = "solid"


def bars(
    cid: str,
    title: str,
    desc: str,
    items: Sequence[Bar],
    v_max: float | None = None,
    horizontal: bool = True,
    cutoff_after: int | None = None,
    cutoff_label: str = "",
) -> str:
    """Bar chart with direct labels; `style` per bar (solid, hatch, dots, grid) adds a pattern.

    cutoff_after: draw a dashed cutoff line after that bar index (vertical histograms).
    """
    vals = [float(b.value.shown) for b in items if b.value.shown is not None]
    top_v = v_max or (max(vals) if vals else 1.0) or 1.0
    if horizontal:
        left, right, row = 190, 90, 30
        width, height = 640, 20 + row * len(items)
        pw = width - left - right
        out = _open(cid, title, desc, width, height)
        for i, b in enumerate(items):
            yy = 10 + i * row
            out.append(f"<text x='{left - 8}' y='{yy + 15}' text-anchor='end'>{escape(b.label)}</text>")
            if b.value.shown is None:
                if b.value.is_suppressed:
                    out.append(_suppressed_box(left, yy + 2, 40, 18))
                    out.append(f"<text x='{left + 48}' y='{yy + 15}' fill='{MUTED}'>suppressed</text>")
                else:
                    out.append(f"<text x='{left}' y='{yy + 15}' fill='{MUTED}'>no data</text>")
                continue
            w = max(pw * float(b.value.shown) / top_v, 1.5)
            out.append(f"<rect x='{left}' y='{yy + 2}' width='{w:.1f}' height='18' "
                       f"fill='{_fill(cid, b.style)}' stroke='{INK}' stroke-width='0.8'/>")
            out.append(f"<text x='{left + w + 6:.1f}' y='{yy + 15}'>{escape(b.text)}</text>")
        out.append("</svg>")
        return "\n".join(out)
    width, height, left, right, top, bottom = 640, 250, 44, 12, 24, 46
    pw, ph = width - left - right, height - top - bottom
    slot = pw / max(len(items), 1)
    out = _open(cid, title, desc, width, height)
    out.append(f"<line x1='{left}' x2='{width - right}' y1='{top + ph}' y2='{top + ph}' stroke='{INK}'/>")
    for i, b in enumerate(items):
        x = left + i * slot + slot * 0.12
        w = slot * 0.76
        out.append(f"<text x='{x + w / 2:.1f}' y='{top + ph + 15}' text-anchor='middle' "
                   f"font-size='10'>{escape(b.label)}</text>")
        if b.value.shown is None:
            if b.value.is_suppressed:
                out.append(_suppressed_box(x, top + ph - 30, w, 30))
            continue
        h = ph * float(b.value.shown) / top_v
        out.append(f"<rect x='{x:.1f}' y='{top + ph - h:.1f}' width='{w:.1f}' height='{h:.1f}' "
                   f"fill='{_fill(cid, b.style)}' stroke='{INK}' stroke-width='0.8'/>")
        out.append(f"<text x='{x + w / 2:.1f}' y='{top + ph - h - 4:.1f}' text-anchor='middle' "
                   f"font-size='10'>{escape(b.text)}</text>")
    if cutoff_after is not None:
        cx = left + (cutoff_after + 1) * slot
        out.append(f"<line x1='{cx:.1f}' x2='{cx:.1f}' y1='{top - 8}' y2='{top + ph}' stroke='{WARN}' "
                   "stroke-width='2' stroke-dasharray='6 3'/>")
        out.append(f"<text x='{cx + 4:.1f}' y='{top - 10}' fill='{WARN}'>{escape(cutoff_label)}</text>")
    out.append("</svg>")
    return "\n".join(out)


@dataclass(frozen=True)
class PrePost:
    """Mean first and last score of one instrument over closed episodes."""

    label: str
    pre: Shown
    post: Shown
    lo: float
    hi: float
    higher_is_better: bool


def pre_post(cid: str, title: str, desc: str, rows: Sequence[PrePost]) -> str:
    """Dumbbell chart: a circle for the mean first score, a triangle for the mean last score."""
    left, right, row = 110, 30, 44
    width, height = 640, 40 + row * len(rows)
    pw = width - left - right
    out = _open(cid, title, desc, width, height)
    out.append(f"<circle cx='{left}' cy='14' r='5' fill='white' stroke='{INK}' stroke-width='2'/>"
               f"<text x='{left + 10}' y='18'>first score</text>"
               f"<path d='M{left + 110} 9 l5 10 h-10 z' fill='{ACCENT}'/>"
               f"<text x='{left + 122}' y='18'>last score</text>")
    for i, r in enumerate(rows):
        yy = 44 + i * row
        out.append(f"<text x='{left - 10}' y='{yy + 4}' text-anchor='end'>{escape(r.label)}</text>")
        out.append(f"<line x1='{left}' x2='{width - right}' y1='{yy}' y2='{yy}' stroke='#e5e8ec'/>")
        out.append(f"<text x='{left}' y='{yy + 18}' fill='{MUTED}' font-size='10'>{_fmt(r.lo, 0)}</text>")
        out.append(f"<text x='{width - right}' y='{yy + 18}' fill='{MUTED}' font-size='10' "
                   f"text-anchor='end'>{_fmt(r.hi, 0)}</text>")
        if r.pre.shown is None or r.post.shown is None:
            out.append(_suppressed_box(left + pw / 2 - 20, yy - 9, 40, 18))
            continue

        def x(v: float, r: PrePost = r) -> float:
            return left + pw * (min(max(v, r.lo), r.hi) - r.lo) / ((r.hi - r.lo) or 1)

        x0, x1 = x(float(r.pre.shown)), x(float(r.post.shown))
        out.append(f"<line x1='{x0:.1f}' x2='{x1:.1f}' y1='{yy}' y2='{yy}' stroke='{INK}' "
                   "stroke-width='2'/>")
        out.append(f"<circle cx='{x0:.1f}' cy='{yy}' r='5' fill='white' stroke='{INK}' stroke-width='2'/>")
        out.append(f"<path d='M{x1:.1f} {yy - 6} l6 11 h-12 z' fill='{ACCENT}'/>")
        out.append(f"<text x='{x0:.1f}' y='{yy - 9}' text-anchor='middle' font-size='10'>"
                   f"{_fmt(r.pre.shown)}</text>")
        out.append(f"<text x='{x1:.1f}' y='{yy - 9}' text-anchor='middle' font-size='10'>"
                   f"{_fmt(r.post.shown)}</text>")
    out.append("</svg>")
    return "\n".join(out)


def estimate_ci(
    cid: str,
    title: str,
    desc: str,
    rows: Sequence[tuple[str, Shown, float | None, float | None]],
    lo: float = -1.0,
    hi: float = 1.0,
    reference: float | None = None,
    reference_label: str = "",
) -> str:
    """Point estimates (diamonds) with confidence-interval whiskers on a common axis."""
    left, right, row = 170, 30, 36
    width, height = 640, 50 + row * len(rows)
    pw = width - left - right

    def x(v: float) -> float:
        return left + pw * (min(max(v, lo), hi) - lo) / (hi - lo)

    out = _open(cid, title, desc, width, height)
    axis_y = height - 22
    out.append(f"<line x1='{left}' x2='{width - right}' y1='{axis_y}' y2='{axis_y}' stroke='{INK}'/>")
    for t in (lo, (lo + 0) / 2, 0.0, hi / 2, hi):
        out.append(f"<line x1='{x(t):.1f}' x2='{x(t):.1f}' y1='{axis_y}' y2='{axis_y + 4}' stroke='{INK}'/>"
                   f"<text x='{x(t):.1f}' y='{axis_y + 16}' text-anchor='middle' fill='{MUTED}' "
                   f"font-size='10'>{t:g}</text>")
    out.append(f"<line x1='{x(0):.1f}' x2='{x(0):.1f}' y1='8' y2='{axis_y}' stroke='{MUTED}'/>")
    if reference is not None:
        out.append(f"<line x1='{x(reference):.1f}' x2='{x(reference):.1f}' y1='8' y2='{axis_y}' "
                   f"stroke='{WARN}' stroke-dasharray='5 3'/>"
                   f"<text x='{x(reference) + 4:.1f}' y='16' fill='{WARN}' font-size='10'>"
                   f"{escape(reference_label)}</text>")
    for i, (label, est, c_lo, c_hi) in enumerate(rows):
        yy = 32 + i * row
        out.append(f"<text x='{left - 10}' y='{yy + 4}' text-anchor='end'>{escape(label)}</text>")
        if est.shown is None:
            if est.is_suppressed:
                out.append(_suppressed_box(x(0) - 20, yy - 9, 40, 18))
            else:
                out.append(f"<text x='{x(0) + 6:.1f}' y='{yy + 4}' fill='{MUTED}'>no data</text>")
            continue
        if c_lo is not None and c_hi is not None:
            out.append(f"<line x1='{x(c_lo):.1f}' x2='{x(c_hi):.1f}' y1='{yy}' y2='{yy}' "
                       f"stroke='{INK}' stroke-width='2'/>"
                       f"<line x1='{x(c_lo):.1f}' x2='{x(c_lo):.1f}' y1='{yy - 5}' y2='{yy + 5}' stroke='{INK}' stroke-width='2'/>"
                       f"<line x1='{x(c_hi):.1f}' x2='{x(c_hi):.1f}' y1='{yy - 5}' y2='{yy + 5}' stroke='{INK}' stroke-width='2'/>")
        e = x(float(est.shown))
        out.append(f"<path d='M{e:.1f} {yy - 7} l7 7 l-7 7 l-7 -7 z' fill='{ACCENT}' stroke='{INK}'/>")
        out.append(f"<text x='{e:.1f}' y='{yy - 10}' text-anchor='middle' font-size='10'>"
                   f"{float(est.shown):.2f}</text>")
    out.append("</svg>")
    return "\n".join(out)
