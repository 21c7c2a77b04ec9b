"""Research CSV import: wide (one row per patient, one column per session score) or long format.

Research data sets rarely carry dates. Occurred-at times are then synthesised from the mapping's
``anchor_date`` plus ``interval_days`` times the session (wide) or time point (long) number, so the
order of measurements is kept; set ``date_column`` (long) when real dates exist. Scores are
imported as total-only questionnaire.submitted events; with ``sessions: true`` each scored session
number (>= ``first_session``) also gets a session.attended event so per-session analyses
(sudden gains) see the sessions. ``fill_session_gaps: true`` also attends the unscored session
numbers from ``first_session`` up to the patient's last scored one: in a wide research file a
missing score inside the series is a missed questionnaire, not a missed session, and the session
series (and so sudden-gain positions) must keep the gap as the source's NA does. One
episode.opened is synthesised per patient.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from alliance.importers.common import (
    ImportResult,
    KeyedEventIds,
    MappingError,
    Quarantined,
    account_csv_rows,
    check_clinic,
    check_timezone,
    compile_pattern,
    describe_value,
    event_id,
    is_missing,
    load_mapping,
    make_event,
    normalise_timestamp,
    number,
    output_stem,
    read_csv_rows,
    require,
    with_clinic,
    write_landing,
)
from alliance.importers.instruments_ref import load_refs


class CsvImporter(KeyedEventIds):
    """Maps the rows of one wide or long CSV file to events under one mapping."""

    def __init__(self, mapping: dict[str, Any], clinic_id: str | None = None,
                 key: bytes | None = None) -> None:
        self.m = mapping
        self._key = key
        self.where = str(mapping.get("_path", "mapping"))
        self.clinic = check_clinic(clinic_id or mapping.get("clinic_id") or "", self.where)
        self.source = str(mapping.get("source") or "csv-import")
        self.format = str(mapping.get("format") or "wide")
        if self.format not in ("wide", "long"):
            raise MappingError(f"{self.where}: format must be 'wide' or 'long', not {self.format!r}")
        self.id_col = str(require(mapping, "id_column"))
        self.tz = ZoneInfo(check_timezone(mapping.get("timezone"), self.where))
        anchor = mapping.get("anchor_date") or "2000-01-03"
        try:
            self.anchor = anchor if isinstance(anchor, date) else date.fromisoformat(str(anchor))
        except ValueError:
            raise MappingError(f"{self.where}: key 'anchor_date': {anchor!r} is not a date "
                               "(YYYY-MM-DD)") from None
        self.interval = self._number(mapping, "interval_days", 7, float, zero_ok=False)
        self.age_group = str(mapping.get("default_age_group") or "adult")
        self.missing = {str(x) for x in mapping.get("missing_values") or []}
        self.timing = {str(k): str(v) for k, v in (mapping.get("timing") or {}).items()}
        self.default_timing = mapping.get("default_timing")
        self.sessions = bool(mapping.get("sessions", False))
        self.first_session = self._number(mapping, "first_session", 1, int)
        self.fill_gaps = bool(mapping.get("fill_session_gaps", False))
        if self.fill_gaps and not self.sessions:
            raise MappingError(f"{self.where}: fill_session_gaps needs sessions: true")
        if self.fill_gaps and mapping.get("date_column"):
            # a gap has no date of its own; inventing one next to real dates would mislead
            raise MappingError(f"{self.where}: fill_session_gaps cannot be used with date_column")
        self.scores = mapping.get("scores") or []
        if not self.scores:
            raise MappingError(f"{self.where}: 'scores' lists no score columns")
        refs = load_refs()
        for i, s in enumerate(self.scores):
            if s.get("instrument") not in refs:
                raise MappingError(f"{self.where}: scores[{i}].instrument {s.get('instrument')!r} "
                                   f"is not defined in schemas/instruments")
            key = "column_pattern" if self.format == "wide" else "column"
            if not s.get(key):
                raise MappingError(f"{self.where}: scores[{i}] needs '{key}' for {self.format} format")
            if self.format == "wide":
                compile_pattern(s[key], self.where, f"scores[{i}].column_pattern")
        self.refs = refs
        self.first_seen: dict[str, str] = {}
        self.attended_numbers: dict[str, set[int]] = {}

    def _number(self, mapping: dict[str, Any], key: str, default: Any, kind: type,
                zero_ok: bool = True) -> Any:
        """A numeric mapping key (not negative; not zero either unless `zero_ok`)."""
        value = mapping.get(key, default)
        try:
            out = kind(value if value is not None else default)
        except (TypeError, ValueError):
            raise MappingError(f"{self.where}: key {key!r}: {value!r} is not a number") from None
        if out < 0 or (out == 0 and not zero_ok):
            raise MappingError(f"{self.where}: key {key!r}: {value!r} must be positive")
        return out

    def when(self, n: float) -> str:
        dt = datetime.combine(self.anchor, time(9, 0), self.tz) + timedelta(days=n * self.interval)
        return dt.isoformat()

    def columns(self, header: list[str]) -> list[tuple[str, dict[str, Any], int]]:
        """Wide format: (column, score spec, session number) for every matching column."""
        out = []
        for spec in self.scores:
            pat = re.compile(spec["column_pattern"])
            for col in header:
                mo = pat.search(col)
                if mo:
                    out.append((col, spec, int(mo.group(1))))
        if not out:
            raise MappingError(f"{self.where}: no column of the file matches any column_pattern")
        return out

    def score(self, raw: str, spec: dict[str, Any], col: str) -> int | float:
        v = number(raw)
        if v is None:
            # (the cell itself is not repeated: it may hold a name or a note)
            raise Quarantined("wrong_type", col, f"score is {describe_value(raw)}")
        ref = self.refs[spec["instrument"]]
        if (ref.total_min is not None and v < ref.total_min) or (
                ref.total_max is not None and v > ref.total_max):
            raise Quarantined("answer_out_of_range", col,
                              f"{v} outside {ref.total_min}..{ref.total_max} for {ref.code}")
        return v

    def submitted(self, pid: str, n: int | float, key: str, spec: dict[str, Any], total: Any,
                  when: str, session: str | None) -> dict[str, Any]:
        ref = self.refs[spec["instrument"]]
        timing = self.timing.get(str(n).removesuffix(".0"), self.default_timing)
        return make_event(
            event_id=event_id(self.key, self.clinic, "csv", pid, key, spec["instrument"]),
            event_type="questionnaire.submitted", occurred_at=when, source=self.source,
            clinic_id=self.clinic, patient_id=pid, episode_id=f"csv:{pid}", session_id=session,
            payload={"instrument": ref.code, "instrument_version": str(spec.get("version") or ref.version),
                     "respondent": str(spec.get("respondent") or "patient"),
                     "administered_at": when, "timing": timing, "total": total})

    def attended(self, pid: str, key: str, when: str) -> dict[str, Any]:
        return make_event(
            event_id=event_id(self.key, self.clinic, "csv", pid, key, "session.attended"),
            event_type="session.attended", occurred_at=when, source=self.source,
            clinic_id=self.clinic, patient_id=pid, episode_id=f"csv:{pid}",
            session_id=f"csv:{pid}:{key}", payload={})

    def row_events(self, row: dict[str, str], cols: list[tuple[str, dict[str, Any], int]]
                   ) -> list[dict[str, Any]]:
        pid = row.get(self.id_col, "").strip()
        if not pid:
            raise Quarantined("missing_field", self.id_col, "no patient id")
        events: list[dict[str, Any]] = []
        sessions_done: set[str] = set()
        if self.format == "wide":
            items = [(col, spec, n) for col, spec, n in cols]
        else:
            tcol = str(require(self.m, "time_column"))
            n = number(row.get(tcol))
            if n is None:
                raise Quarantined("wrong_type" if row.get(tcol) else "missing_field", tcol,
                                  f"time is {describe_value(row.get(tcol))}" if row.get(tcol)
                                  else "time is missing")
            items = [(spec["column"], spec, n) for spec in self.scores]
        for col, spec, n in items:
            raw = row.get(col)
            if raw is None:
                raise Quarantined("missing_field", col, "column not in the file")
            if is_missing(raw, self.missing):
                continue
            total = self.score(raw, spec, col)
            key = f"t{n}"
            when = self.when(n)
            if self.format == "long" and self.m.get("date_column"):
                dcol = str(self.m["date_column"])
                when = normalise_timestamp(row.get(dcol), str(self.tz)) or ""
                if not when:
                    raise Quarantined("invalid_value", dcol, "needs an ISO-8601 date")
            has_session = self.sessions and n >= self.first_session
            session = f"csv:{pid}:{key}" if has_session else None
            events.append(self.submitted(pid, n, key, spec, total, when, session))
            if has_session and key not in sessions_done:
                sessions_done.add(key)
                events.append(self.attended(pid, key, when))
                if float(n).is_integer():
                    self.attended_numbers.setdefault(pid, set()).add(int(n))
        for ev in events:
            prev = self.first_seen.get(pid)
            if prev is None or datetime.fromisoformat(ev["occurred_at"]) < datetime.fromisoformat(prev):
                self.first_seen[pid] = ev["occurred_at"]
        return events

    def synthesised_gap_sessions(self) -> list[dict[str, Any]]:
        """session.attended for unscored session numbers inside each patient's scored series."""
        if not self.fill_gaps:
            return []
        out = []
        for pid, done in sorted(self.attended_numbers.items()):
            for n in range(self.first_session, max(done)):
                if n not in done:
                    out.append(self.attended(pid, f"t{n}", self.when(n)))
        return out

    def synthesised_episodes(self) -> list[dict[str, Any]]:
        return [make_event(event_id=event_id(self.key, self.clinic, "csv-episode", pid),
                           event_type="episode.opened", occurred_at=first, source=self.source,
                           clinic_id=self.clinic, patient_id=pid, episode_id=f"csv:{pid}",
                           payload={"age_group": self.age_group})
                for pid, first in sorted(self.first_seen.items())]


def import_wide_csv(path: Path | str, mapping: dict[str, Any] | str | Path,
                    *, clinic_id: str | None = None, key: bytes | None = None) -> ImportResult:
    """Convert a wide or long research CSV into canonical events, accounting for every row."""
    path = Path(path)
    m = mapping if isinstance(mapping, dict) else load_mapping(mapping, "wide_csv")
    imp = CsvImporter(m, clinic_id, key)
    header, rows = read_csv_rows(path, str(m.get("delimiter") or ","))
    if imp.id_col not in header:
        raise MappingError(f"{path}: line 1: id column {imp.id_col!r} not in the header "
                           f"(mapping {imp.where})")
    cols = imp.columns(header) if imp.format == "wide" else []
    result = ImportResult("wide_csv")
    if imp.format == "wide":
        # A column no score pattern and no *_column key reads is not imported: listed, so a
        # typo in a header or a pattern is seen instead of silently dropping its scores.
        read = {c for c, _, _ in cols} | {str(v) for k, v in m.items()
                                          if k.endswith("_column") and isinstance(v, str)}
        result.unmapped_columns = [h for h in header if h and h not in read]
    account_csv_rows(result, path, header, rows, lambda row: imp.row_events(row, cols),
                     "no non-missing score")
    synth = imp.synthesised_gap_sessions() + imp.synthesised_episodes()
    result.events.extend(synth)
    result.synthesised = len(synth)
    return result


def import_wide_csv_to_landing(path: Path | str, mapping: dict[str, Any] | str | Path,
                               out_dir: Path, *, clinic_id: str | None = None,
                               key: bytes | None = None) -> ImportResult:
    """Import a research CSV and write `<stem>.ndjson` into landing (reports: report_dir)."""
    m = mapping if isinstance(mapping, dict) else load_mapping(mapping, "wide_csv")
    m = with_clinic(m, clinic_id)
    result = import_wide_csv(path, m, key=key)
    return write_landing(result, Path(out_dir), output_stem("csv", [Path(path)], m, key))
