"""REDCap import: a flat CSV export ("raw" or "labels") plus its data dictionary, via a mapping.

The data dictionary tells which fields belong to which form, their type (radio, dropdown,
checkbox, calc, text) and their choices ("0, Not at all | 1, Several days | ..."). A scored item's
weight is its choice code (or ``choice_weights`` from the mapping when codes are not the weights);
a label export is mapped back through the choice labels. A checkbox field used as an item exports
as ``field___<code>`` columns: exactly one ticked box gives the item its code, none is a missing
item, two or more quarantine the row. Longitudinal projects (``redcap_event_name``) and repeating
instruments (``redcap_repeat_instrument`` / ``redcap_repeat_instance``) are keys of the event id.

A CSV row is one record for the accounting: it produces events, is skipped (no complete mapped
form), or is quarantined as a whole (any mapped form on it unmappable).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from alliance.importers.common import (
    ImportResult,
    KeyedEventIds,
    MappingError,
    Quarantined,
    account_csv_rows,
    check_answers,
    check_clinic,
    check_timezone,
    compile_pattern,
    event_id,
    is_missing,
    load_mapping,
    make_event,
    normalise_timestamp,
    number,
    output_stem,
    read_csv_rows,
    with_clinic,
    write_landing,
)
from alliance.importers.instruments_ref import load_refs


def _col(header: list[str], *starts: str, path: Path | None = None) -> str:
    for h in header:
        if h.strip().lower().startswith(starts):
            return h
    raise MappingError(f"{path or 'data dictionary'}: line 1: no column starting with "
                       f"{starts[0]!r} (a REDCap data dictionary export is expected)")


def read_dictionary(path: Path) -> dict[str, dict[str, Any]]:
    """Field name -> {form, type, choices: {code: label}} from a REDCap data dictionary CSV."""
    header, rows = read_csv_rows(path)
    if not header:
        raise MappingError(f"{path}: empty data dictionary")
    c_name = _col(header, "variable", path=path)
    c_form = _col(header, "form name", "form", path=path)
    c_type = _col(header, "field type", path=path)
    c_choices = _col(header, "choices", path=path)
    out: dict[str, dict[str, Any]] = {}
    for line, row in rows:
        if not row:
            if row is None:
                raise MappingError(f"{path}: line {line}: wrong number of columns")
            continue
        choices: dict[str, str] = {}
        if row[c_type] in ("radio", "dropdown", "checkbox"):
            for part in row[c_choices].split("|"):
                if "," in part:
                    code, label = part.split(",", 1)
                    choices[code.strip()] = label.strip()
        out[row[c_name].strip()] = {"form": row[c_form].strip(), "type": row[c_type].strip(),
                                    "choices": choices, "line": line}
    return out


class RedcapImporter(KeyedEventIds):
    """Maps rows of one REDCap export to events, guided by the data dictionary and a mapping."""

    def __init__(self, mapping: dict[str, Any], dictionary: dict[str, dict[str, Any]],
                 clinic_id: str | None = None, key: bytes | None = None) -> None:
        self.m = mapping
        self._key = key
        self.where = str(mapping.get("_path", "mapping"))
        self.clinic = check_clinic(clinic_id or mapping.get("clinic_id") or "", self.where)
        self.source = str(mapping.get("source") or "redcap")
        self.tz = check_timezone(mapping.get("timezone"), self.where)
        self.record = str(mapping.get("record_id_field") or "record_id")
        self.event_f = str(mapping.get("event_field") or "redcap_event_name")
        self.rep_form_f = str(mapping.get("repeat_instrument_field") or "redcap_repeat_instrument")
        self.rep_inst_f = str(mapping.get("repeat_instance_field") or "redcap_repeat_instance")
        self.age_group = str(mapping.get("default_age_group") or "adult")
        self.dd = dictionary
        self.refs = load_refs()
        self.forms = []
        for i, f in enumerate(mapping.get("instruments") or []):
            form = str(f.get("form") or "")
            if f.get("instrument") not in self.refs:
                raise MappingError(f"{self.where}: instruments[{i}].instrument "
                                   f"{f.get('instrument')!r} not in schemas/instruments")
            fields = [n for n, d in dictionary.items() if d["form"] == form]
            if not fields:
                raise MappingError(f"{self.where}: instruments[{i}].form {form!r} has no fields "
                                   "in the data dictionary")
            items = {str(k): str(v) for k, v in (f.get("items") or {}).items()}
            if f.get("item_pattern"):
                pat = compile_pattern(f["item_pattern"], self.where, f"instruments[{i}].item_pattern")
                for n in fields:
                    if (mo := pat.search(n)) and n not in items:
                        items[n] = str(int(mo.group(1)))
            for n in [*items, f.get("total_field"), f.get("date_field")]:
                if n and n not in dictionary:
                    raise MappingError(f"{self.where}: instruments[{i}]: field {n!r} is not in "
                                       "the data dictionary")
            if not items and not f.get("total_field"):
                raise MappingError(f"{self.where}: instruments[{i}] maps no items and no total")
            if f.get("date_field") in (None, ""):
                # (named here: require() knows only the mapping file's top level)
                raise MappingError(f"{self.where}: instruments[{i}]: required key 'date_field' "
                                   "is missing (the field holding the date the form was filled in)")
            self.forms.append({**f, "form": form, "_items": items})
        if not self.forms:
            raise MappingError(f"{self.where}: 'instruments' is empty")
        self.first_seen: dict[str, str] = {}

    def value(self, row: dict[str, str], field: str, spec: dict[str, Any]) -> Any:
        d = self.dd[field]
        weights = {str(k): v for k, v in ((spec.get("choice_weights") or {}).get(field)
                                          or (spec.get("choice_weights") or {}).get("*") or {}).items()}
        if d["type"] == "checkbox":
            ticked = [code for code in d["choices"]
                      if str(row.get(f"{field}___{code.lower()}", row.get(f"{field}___{code}", "")))
                      .strip() in ("1", "Checked")]
            if len(ticked) > 1:
                raise Quarantined("multiple_answers", field, f"{len(ticked)} boxes ticked")
            if not ticked:
                return None
            code = ticked[0]
        else:
            raw = row.get(field)
            if raw is None:
                raise Quarantined("missing_field", field, "column not in the export")
            if is_missing(raw):
                return None
            code = raw.strip()
            if d["choices"] and code not in d["choices"]:
                # A "labels" export: map the label back to its code.
                by_label = {v: k for k, v in d["choices"].items()}
                if code not in by_label:
                    raise Quarantined("invalid_value", field, "value is not one of the field's choices")
                code = by_label[code]
        w = weights.get(code, code)
        v = number(w)
        if v is None:
            raise Quarantined("unmapped_answer", field,
                              f"choice code {code!r} is not a number; add it to choice_weights")
        return v

    def form_event(self, row: dict[str, str], spec: dict[str, Any], rec: str, ev_name: str,
                   instance: str) -> dict[str, Any] | None:
        complete_f = spec.get("complete_field") or f"{spec['form']}_complete"
        complete_vals = {str(x) for x in spec.get("complete_values") or ["2", "Complete"]}
        if complete_f in row and row[complete_f].strip() not in complete_vals:
            return None
        answers = {item: self.value(row, f, spec) for f, item in spec["_items"].items()}
        total = None
        if spec.get("total_field"):
            total = number(row.get(spec["total_field"], ""))
            if total is None and not is_missing(row.get(spec["total_field"])):
                raise Quarantined("wrong_type", spec["total_field"], "total is not a number")
        if all(v is None for v in answers.values()) and total is None:
            return None
        ref = self.refs[spec["instrument"]]
        field_of = {item: f for f, item in spec["_items"].items()}
        check_answers(ref, answers, total, lambda item: field_of.get(item, f"item {item}"),
                      str(spec.get("total_field") or "total"))
        when = normalise_timestamp(row.get(spec["date_field"]), self.tz)
        if when is None:
            raise Quarantined("missing_field" if is_missing(row.get(spec["date_field"]))
                              else "invalid_value", spec["date_field"], "needs a date (YYYY-MM-DD)")
        session_by = spec.get("session_by") or "none"
        session = {"event": f"redcap:{rec}:{ev_name}" if ev_name else None,
                   "instance": f"redcap:{rec}:{ev_name}:{instance}" if instance else None,
                   }.get(session_by)
        timing = (spec.get("timing_by_event") or {}).get(ev_name, spec.get("default_timing"))
        return make_event(
            event_id=event_id(self.key, self.clinic, "redcap", rec, ev_name, spec["form"], instance),
            event_type="questionnaire.submitted", occurred_at=when, source=self.source,
            clinic_id=self.clinic, patient_id=rec, episode_id=f"redcap:{rec}", session_id=session,
            payload={"instrument": ref.code,
                     "instrument_version": str(spec.get("version") or ref.version),
                     "respondent": str(spec.get("respondent") or "patient"),
                     "administered_at": when, "timing": timing,
                     "answers": dict(sorted(answers.items(), key=lambda kv: int(kv[0])))
                     if answers else None,
                     "total": total})

    def row_events(self, row: dict[str, str]) -> list[dict[str, Any]]:
        rec = (row.get(self.record) or "").strip()
        if not rec:
            raise Quarantined("missing_field", self.record, "no record id")
        ev_name = (row.get(self.event_f) or "").strip()
        rep_form = (row.get(self.rep_form_f) or "").strip()
        instance = (row.get(self.rep_inst_f) or "").strip()
        events = []
        for spec in self.forms:
            # A repeating-instrument row holds only that form; the base row only the others.
            if rep_form and rep_form != spec["form"]:
                continue
            # The instance is part of the event id for repeating instruments, and for the second
            # and later instances of a repeating event (the first keeps the id it had before
            # repeating events were told apart, so re-imports still match what was ingested).
            inst = instance if rep_form else ("" if instance in ("", "1") else instance)
            ev = self.form_event(row, spec, rec, ev_name, inst)
            if ev is not None:
                events.append(ev)
        for ev in events:
            prev = self.first_seen.get(rec)
            if prev is None or datetime.fromisoformat(ev["occurred_at"]) < datetime.fromisoformat(prev):
                self.first_seen[rec] = ev["occurred_at"]
        return events

    def synthesised_episodes(self) -> list[dict[str, Any]]:
        return [make_event(event_id=event_id(self.key, self.clinic, "redcap-episode", rec),
                           event_type="episode.opened", occurred_at=first, source=self.source,
                           clinic_id=self.clinic, patient_id=rec, episode_id=f"redcap:{rec}",
                           payload={"age_group": self.age_group})
                for rec, first in sorted(self.first_seen.items())]


def import_redcap(path: Path | str, dictionary: Path | str, mapping: dict[str, Any] | str | Path,
                  *, clinic_id: str | None = None, key: bytes | None = None) -> ImportResult:
    """Convert a REDCap flat CSV export into canonical events, accounting for every row."""
    path = Path(path)
    m = mapping if isinstance(mapping, dict) else load_mapping(mapping, "redcap")
    imp = RedcapImporter(m, read_dictionary(Path(dictionary)), clinic_id, key)
    header, rows = read_csv_rows(path)
    if imp.record not in header:
        raise MappingError(f"{path}: line 1: record id field {imp.record!r} not in the header")
    result = ImportResult("redcap")
    account_csv_rows(result, path, header, rows, imp.row_events, "no complete mapped form on the row")
    synth = imp.synthesised_episodes()
    result.events.extend(synth)
    result.synthesised = len(synth)
    return result


def import_redcap_to_landing(path: Path | str, dictionary: Path | str,
                             mapping: dict[str, Any] | str | Path, out_dir: Path,
                             *, clinic_id: str | None = None,
                             key: bytes | None = None) -> ImportResult:
    """Import a REDCap export and write `<stem>.ndjson` into landing (reports: report_dir)."""
    m = mapping if isinstance(mapping, dict) else load_mapping(mapping, "redcap")
    m = with_clinic(m, clinic_id)
    result = import_redcap(path, dictionary, m, key=key)
    return write_landing(result, Path(out_dir),
                         output_stem("redcap", [Path(path), Path(dictionary)], m, key))
