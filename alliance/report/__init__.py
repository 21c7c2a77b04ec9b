"""Monthly clinic reports: one self-contained, printable HTML file per clinic and month.

Entry point: :func:`build_report` reads the published snapshot (read-only), applies small-cell
suppression, renders `template.html.j2` with inline CSS and inline SVG charts, and writes
`<reports>/<clinic>/<YYYY-MM>.html` (plus a PDF when asked and Chromium is present).
No Dagster imports: the Dagster asset and the CLI both call this.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import duckdb
import jinja2

import alliance
from alliance.report import context as _context
from alliance.report.context import Options
from alliance.report.data import JT_CATEGORIES, Period, extract, parse_month

__all__ = ["Options", "ReportResult", "build_report", "render_html", "write_pdf", "report_path",
           "parse_month", "CHROMIUM"]

CHROMIUM = os.environ.get("ALLIANCE_CHROMIUM", "/usr/bin/chromium")
_CLINIC_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Columns of seeds.instruments worth printing in the methods table, when present.
INSTRUMENT_COLS = ["instrument", "instrument_version", "name", "construct", "higher_is_better",
                   "total_min", "total_max", "clinical_cutoff", "reliable_change", "source", "citation"]


@dataclass(frozen=True)
class ReportResult:
    """What one report build wrote, and a few figures for Dagster metadata."""

    html_path: Path
    pdf_path: Path | None
    bytes: int
    charts: int
    suppressed_cells: int


def report_path(reports_dir: Path, clinic: str, month: str) -> Path:
    """Where the report of a clinic and month lives: <reports>/<clinic>/<YYYY-MM>.html."""
    if not _CLINIC_RE.match(clinic):
        raise ValueError(f"clinic {clinic!r}: only letters, digits, '-' and '_' are allowed")
    return Path(reports_dir) / clinic / f"{parse_month(month):%Y-%m}.html"


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=True, undefined=jinja2.ChainableUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )


def render_html(ctx: dict[str, object]) -> str:
    """Render the report template from a context built by `alliance.report.context.build`."""
    return _env().get_template("template.html.j2").render(**ctx)


def platform_version() -> str:
    """The platform version printed in the report header (alliance.__version__)."""
    v = getattr(alliance, "__version__", None)
    if v:
        return str(v)
    # An editable install made before alliance/__init__.py existed maps `alliance` as a namespace
    # package (no __version__); the installed distribution's version is the same number.
    from importlib.metadata import version

    return version("alliance-platform")


def _count_suppressed(html: str) -> int:
    return html.count("[s]")


def build_report(
    serving_path: Path | str,
    reports_dir: Path | str,
    clinic: str,
    month: str,
    options: Options | None = None,
    pdf: bool = False,
    window_months: int = 12,
) -> ReportResult:
    """Build the report of one clinic and month from the snapshot at `serving_path`."""
    options = options or Options()
    serving_path = Path(serving_path)
    if not serving_path.exists():
        raise FileNotFoundError(
            f"{serving_path}: no published snapshot; run the pipeline (alliance run) first")
    out = report_path(Path(reports_dir), clinic, month)
    period = Period(parse_month(month), window_months)
    with duckdb.connect(str(serving_path), read_only=True) as con:
        from alliance.sqlrunner import MODEL_TIME_ZONE

        con.execute(f"set TimeZone = '{MODEL_TIME_ZONE}'")  # months as the marts cut them
        raw = extract(con, clinic, period)
    ctx = _context.build(raw, options)
    inst_cols = [c for c in INSTRUMENT_COLS if raw.instruments and c in raw.instruments[0]]
    ctx.update(
        clinic=clinic, version=platform_version(), jt_categories=JT_CATEGORIES,
        instrument_cols=inst_cols,
        generated_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    html = render_html(ctx)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a reader never sees half a report.
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, out)
    pdf_path = write_pdf(out) if pdf else None
    return ReportResult(out, pdf_path, len(html.encode()), html.count("<svg"), _count_suppressed(html))


def write_pdf(html_path: Path, chromium: str = CHROMIUM, timeout: float = 60) -> Path | None:
    """Print the HTML report to PDF with headless Chromium; None when Chromium is not installed."""
    exe = chromium if Path(chromium).exists() else shutil.which("chromium")
    if not exe:
        return None
    pdf = html_path.with_suffix(".pdf")
    with tempfile.TemporaryDirectory(prefix="alliance-chromium-") as profile:
        subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             "--no-pdf-header-footer", f"--user-data-dir={profile}",
             f"--print-to-pdf={pdf}", html_path.resolve().as_uri()],
            check=True, capture_output=True, timeout=timeout,
        )
    return pdf if pdf.exists() else None
