"""FHIR R4 import: bulk-export NDJSON, Bundles and single resources into canonical events.

What becomes what (schemas/mappings/fhir.yaml configures the details):

- QuestionnaireResponse -> questionnaire.submitted (amended -> questionnaire.amended,
  entered-in-error -> questionnaire.retracted). Answers are found by linkId; weights come from
  valueInteger/valueDecimal, or for valueCoding from the Questionnaire's own answer weights
  (``ordinalValue`` / ``itemWeight`` extensions on answerOption or on the concepts of a contained or
  imported ValueSet), then from the mapping's ``answer_weights`` (LOINC answer codes). A reported
  total (e.g. LOINC 44261-6) is carried as ``payload.total`` so scoring flags a mismatch.
- Observation: a score panel (PHQ-9 44249-1, GAD-7 69737-5) with item components/members ->
  questionnaire.submitted with answers; a lone total (44261-6, 70274-6) -> a total-only submission.
- Encounter -> session.attended / cancelled / no_show / scheduled; EpisodeOfCare -> episode.opened
  (+ episode.closed); patients without one get one episode.opened synthesised from their first event.
- Patient -> no event. Only its id (or, if configured, one identifier) is kept as patient_id, which
  the ingest pseudonymises. Names, addresses, telecoms and other identifiers are never written.

Everything else is skipped with a reason (out of scope) or quarantined (in scope, unmappable).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from alliance.importers.common import (
    ImportResult,
    KeyedEventIds,
    MappingError,
    Quarantined,
    Skipped,
    check_answers,
    check_clinic,
    check_timezone,
    compile_pattern,
    event_id,
    load_mapping,
    make_event,
    normalise_timestamp,
    number,
    output_stem,
    with_clinic,
    write_landing,
)
from alliance.importers.instruments_ref import InstrumentRef, load_refs

WEIGHT_EXTENSIONS = ("/ordinalValue", "/itemWeight", "/iso21090-CO-value")
FHIR_SUFFIXES = (".ndjson", ".jsonl", ".json")
DEFAULT_MAPPING = "fhir.yaml"
SYNTH_EPISODE = "fhir:episode-of:"


# --------------------------------------------------------------------------- reading records


@dataclass
class Record:
    """One FHIR resource and where it came from (file and line, or Bundle entry number)."""

    path: str
    line: int
    resource: dict[str, Any] | None
    error: Quarantined | None = None
    blank: bool = False


def fhir_files(inputs: list[Path]) -> list[Path]:
    """The FHIR files to read: given files, and *.ndjson / *.json found in given folders."""
    out: list[Path] = []
    for p in inputs:
        if p.is_dir():
            out.extend(sorted(x for x in p.rglob("*") if x.is_file()
                              and x.name.endswith(FHIR_SUFFIXES) and not x.name.startswith(".")))
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


def iter_records(path: Path) -> Iterator[Record]:
    """Resources of one file: each NDJSON line, each Bundle entry, or the single resource."""
    text_path = str(path)
    if path.name.endswith((".ndjson", ".jsonl")):
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield Record(text_path, n, None, Quarantined("invalid_encoding", "", "not UTF-8"))
                    continue
                if not line.strip():
                    yield Record(text_path, n, None, blank=True)
                    continue
                try:
                    res = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Record(text_path, n, None, Quarantined("malformed_json", "", str(e)))
                    continue
                yield from _expand(text_path, n, res)
        return
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        yield Record(text_path, 1, None, Quarantined("malformed_json", "", str(e)[:200]))
        return
    yield from _expand(text_path, 1, res)


def _expand(path: str, line: int, res: Any) -> Iterator[Record]:
    if not isinstance(res, dict) or "resourceType" not in res:
        yield Record(path, line, None, Quarantined("not_a_resource", "resourceType",
                                                   "not a FHIR resource (no resourceType)"))
        return
    if res["resourceType"] == "Bundle":
        # Entries are numbered within the file: a Bundle file's "line" N is its Nth entry.
        entries = res.get("entry") or []
        if not isinstance(entries, list):
            yield Record(path, line, None, Quarantined("malformed_resource", "entry",
                                                       "Bundle.entry is not a list"))
            return
        if not entries:
            yield Record(path, line, None, Quarantined("empty_bundle", "entry", "Bundle has no entries"))
        for i, entry in enumerate(entries, start=1):
            inner = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(inner, dict) or "resourceType" not in inner:
                yield Record(path, i, None, Quarantined("not_a_resource", f"entry[{i - 1}].resource",
                                                        "Bundle entry without a resource"))
                continue
            if inner.get("resourceType") == "Bundle":
                yield Record(path, i, None, Quarantined("nested_bundle", f"entry[{i - 1}]",
                                                        "nested Bundles are not imported"))
                continue
            full_url = entry.get("fullUrl")
            if isinstance(full_url, str) and full_url and "id" not in inner:
                inner = {**inner, "id": full_url.rsplit("/", 1)[-1].removeprefix("urn:uuid:")}
            yield Record(path, i, inner)
        return
    yield Record(path, line, res)


# --------------------------------------------------------------------------- references


def ref_id(ref: Any, rtype: str | None = None) -> str | None:
    """The id in a Reference: "Patient/x", ".../Patient/x/_history/2", "urn:uuid:x",
    or a conditional reference "Patient?identifier=system|value" (the value)."""
    if not isinstance(ref, dict):
        return None
    r = ref.get("reference")
    if not r:
        ident = ref.get("identifier") or {}
        return str(ident["value"]) if ident.get("value") else None
    r = str(r)
    if r.startswith("urn:uuid:") or r.startswith("urn:oid:"):
        return r.split(":", 2)[-1]
    if "?" in r:
        query = r.split("?", 1)[1]
        for part in query.split("&"):
            if part.startswith("identifier="):
                return part.split("=", 1)[1].split("|")[-1] or None
        return None
    r = re.sub(r"/_history/[^/]+$", "", r)
    parts = r.rstrip("/").split("/")
    if len(parts) >= 2 and (rtype is None or parts[-2] == rtype):
        return parts[-1]
    return None


def ref_type(ref: Any) -> str | None:
    if not isinstance(ref, dict):
        return None
    if ref.get("type"):
        return str(ref["type"])
    r = str(ref.get("reference") or "")
    r = re.sub(r"/_history/[^/]+$", "", r).split("?", 1)[0]
    parts = r.rstrip("/").split("/")
    if "?" in str(ref.get("reference") or ""):
        return parts[-1] or None
    return parts[-2] if len(parts) >= 2 else None


def _codes(concept: Any) -> list[tuple[str, str]]:
    """(system, code) pairs of a CodeableConcept or a list of Codings."""
    if isinstance(concept, list):
        return [(str(c.get("system", "")), str(c.get("code"))) for c in concept
                if isinstance(c, dict) and c.get("code")]
    if isinstance(concept, dict):
        return _codes(concept.get("coding") or [])
    return []


def _weight_ext(obj: Any) -> float | int | None:
    for ext in (obj or {}).get("extension") or [] if isinstance(obj, dict) else []:
        if str(ext.get("url", "")).endswith(WEIGHT_EXTENSIONS):
            for k in ("valueDecimal", "valueInteger"):
                if k in ext:
                    return number(ext[k])
    return None


# --------------------------------------------------------------------------- the index (pass 1)


@dataclass
class Index:
    """What later records need from others: Questionnaires, ValueSets, Patients, panels."""

    questionnaires: dict[str, dict[str, Any]] = field(default_factory=dict)  # url, id -> resource
    valuesets: dict[str, dict[str, Any]] = field(default_factory=dict)
    patient_ids: dict[str, str] = field(default_factory=dict)  # resource id -> patient_id
    episodes_of_care: set[str] = field(default_factory=set)
    # Encounter id -> its episodeOfCare references: a response or score that names only its
    # Encounter belongs to that Encounter's episode.
    encounter_episodes: dict[str, list[Any]] = field(default_factory=dict)
    panel_members: dict[str, str] = field(default_factory=dict)  # member obs id -> panel id
    observations: dict[str, dict[str, Any]] = field(default_factory=dict)  # item/total obs by id


def build_index(files: list[Path], mapping: dict[str, Any]) -> Index:
    idx = Index()
    patient_system = mapping.get("patient_identifier_system")
    watched = _observation_codes(mapping)
    for path in files:
        for rec in iter_records(path):
            res = rec.resource
            if res is None:
                continue
            rt = res.get("resourceType")
            if rt == "Questionnaire":
                for key in (res.get("url"), f"Questionnaire/{res.get('id')}"):
                    if key:
                        idx.questionnaires[str(key)] = res
            elif rt == "ValueSet" and res.get("url"):
                idx.valuesets[str(res["url"])] = res
            elif rt == "Patient" and res.get("id"):
                pid = str(res["id"])
                if patient_system:
                    # Only the one configured identifier is kept; it never leaves this map
                    # except as patient_id, which the ingest pseudonymises.
                    for ident in res.get("identifier") or []:
                        if ident.get("system") == patient_system and ident.get("value"):
                            idx.patient_ids[pid] = str(ident["value"])
                            break
                else:
                    idx.patient_ids[pid] = pid
            elif rt == "EpisodeOfCare" and res.get("id"):
                idx.episodes_of_care.add(str(res["id"]))
            elif rt == "Encounter" and res.get("id") and res.get("episodeOfCare"):
                idx.encounter_episodes[str(res["id"])] = list(res["episodeOfCare"])
            elif rt == "Observation" and res.get("id"):
                codes = {c for _, c in _codes(res.get("code"))}
                if codes & watched["panels"]:
                    for m in res.get("hasMember") or []:
                        mid = ref_id(m, "Observation")
                        if mid:
                            idx.panel_members[mid] = str(res["id"])
                if codes & (watched["items"] | watched["totals"]):
                    # Only what a panel needs from its members: code and value.
                    idx.observations[str(res["id"])] = {
                        "code": res.get("code"),
                        "valueInteger": res.get("valueInteger"),
                        "valueQuantity": res.get("valueQuantity"),
                        "valueCodeableConcept": res.get("valueCodeableConcept"),
                        "valueDecimal": res.get("valueDecimal"),
                    }
    return idx


def _observation_codes(mapping: dict[str, Any]) -> dict[str, set[str]]:
    refs = _loinc_refs(mapping)
    return {
        "panels": {r.loinc_panel for r in refs.values() if r.loinc_panel},
        "totals": {r.loinc_total for r in refs.values() if r.loinc_total}
        | set((mapping.get("observation_totals") or {}).keys()),
        "items": {c for r in refs.values() for c in r.loinc_items},
    }


def _loinc_refs(mapping: dict[str, Any]) -> dict[str, InstrumentRef]:
    """Instruments with LOINC codes: from schemas/instruments, overridable in the mapping."""
    refs = {k: v for k, v in load_refs().items() if v.loinc_panel or v.loinc_items}
    for code, spec in (mapping.get("loinc_instruments") or {}).items():
        base = refs.get(code) or load_refs().get(code) or InstrumentRef(code, "1")
        refs[code] = InstrumentRef(
            code=code, version=str(spec.get("version", base.version)),
            item_count=base.item_count, item_min=base.item_min, item_max=base.item_max,
            total_min=base.total_min, total_max=base.total_max,
            loinc_panel=str(spec.get("panel", base.loinc_panel or "")) or None,
            loinc_total=str(spec.get("total", base.loinc_total or "")) or None,
            loinc_items={str(c): str(i) for i, c in (spec.get("items") or {}).items()}
            or base.loinc_items,
        )
    return refs


# --------------------------------------------------------------------------- the importer


class FhirImporter(KeyedEventIds):
    """Turns FHIR resources into canonical events under one mapping (see module docstring)."""

    def __init__(self, mapping: dict[str, Any], clinic_id: str | None = None,
                 key: bytes | None = None) -> None:
        self.m = mapping
        self._key = key
        where = mapping.get("_path", "mapping")
        self.clinic = check_clinic(clinic_id or mapping.get("clinic_id") or "", where)
        self.source = str(mapping.get("source") or "fhir-import")
        self.tz = check_timezone(mapping.get("timezone"), where)
        self.age_group = str(mapping.get("default_age_group") or "adult")
        self.refs = load_refs()
        self.loinc = _loinc_refs(mapping)
        # The mapping's tables are checked for their shape here: a list where a table belongs
        # failed on every record later, where it read as a malformed record, not a mapping error.
        def table(value: Any, key: str) -> dict[str, Any]:
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise MappingError(f"{where}: key '{key}' must be a table (key: value), got "
                                   f"{type(value).__name__}")
            return value

        self.answer_weights = {str(k): v for k, v in
                               table(mapping.get("answer_weights"), "answer_weights").items()}
        enc = table(mapping.get("encounter"), "encounter")
        table(enc.get("status"), "encounter.status")
        table(enc.get("class_modality"), "encounter.class_modality")
        table(mapping.get("episode_of_care"), "episode_of_care")
        table((mapping.get("episode_of_care") or {}).get("close_reason"),
              "episode_of_care.close_reason")
        table(mapping.get("respondent_by_author"), "respondent_by_author")
        table(mapping.get("observation_totals"), "observation_totals")
        if not isinstance(mapping.get("questionnaires") or [], list):
            raise MappingError(f"{where}: key 'questionnaires' must be a list")
        self.enc_status: dict[str, str] = enc.get("status") or {}
        self.class_modality: dict[str, str] = enc.get("class_modality") or {}
        self.enc_types = {str(x) for x in enc.get("type_codes") or []}
        self.therapist_from_participant = bool(enc.get("therapist_from_participant", True))
        self.eoc = mapping.get("episode_of_care") or {}
        self.qmaps = mapping.get("questionnaires") or []
        for i, q in enumerate(self.qmaps):
            if not q.get("canonical") or not q.get("instrument"):
                raise MappingError(f"{where}: questionnaires[{i}] needs 'canonical' and 'instrument'")
            if q.get("item_link_pattern"):
                compile_pattern(q["item_link_pattern"], where,
                                f"questionnaires[{i}].item_link_pattern")
        self.idx = Index()
        # patient -> (first occurred_at, first record's file:line) for synthesised episodes
        self.first_seen: dict[str, str] = {}

    # ----- shared helpers

    def patient(self, ref: Any, field_name: str) -> str:
        pid = ref_id(ref, "Patient")
        if pid is None and ref_type(ref) == "Patient":
            pid = ref_id(ref)
        if not pid:
            raise Quarantined("missing_field", field_name, "no Patient reference")
        if self.m.get("patient_identifier_system"):
            if pid not in self.idx.patient_ids:
                raise Quarantined("unknown_patient", field_name,
                                  "Patient resource with the configured identifier system not in the input")
            return self.idx.patient_ids[pid]
        return self.idx.patient_ids.get(pid, pid)

    def episode_for(self, patient_id: str, eoc_refs: Any) -> str:
        """The EpisodeOfCare the record names, else the patient's synthesised episode."""
        for r in eoc_refs or []:
            eid = ref_id(r, "EpisodeOfCare")
            if eid and eid in self.idx.episodes_of_care:
                return f"fhir:EpisodeOfCare/{eid}"
        return f"{SYNTH_EPISODE}{patient_id}"

    def ts(self, value: Any, field_name: str) -> str:
        out = normalise_timestamp(value, self.tz)
        if out is None:
            if isinstance(value, str) and re.fullmatch(r"\d{4}", value.strip()):
                # valid FHIR, but a year cannot place a score or a session among the others
                # (a year-month is read as the month's first day)
                raise Quarantined("invalid_value", field_name,
                                  "has only a year: too coarse to place the record in time "
                                  "(a day, or at least a month, is needed)")
            raise Quarantined("invalid_value" if value else "missing_field", field_name,
                              "needs an ISO-8601 date or dateTime")
        return out

    def ev(self, rid: str, event_type: str, suffix: str = "", **kw: Any) -> dict[str, Any]:
        return make_event(event_id=event_id(self.key, self.clinic, rid, event_type, suffix),
                          event_type=event_type, source=self.source, clinic_id=self.clinic, **kw)

    # ----- dispatch

    def convert(self, res: dict[str, Any]) -> list[dict[str, Any]]:
        rt = res.get("resourceType")
        if not res.get("id"):
            raise Quarantined("missing_field", "id", f"{rt} without an id")
        handler = {
            "QuestionnaireResponse": self.questionnaire_response,
            "Observation": self.observation,
            "Encounter": self.encounter,
            "EpisodeOfCare": self.episode_of_care,
        }.get(str(rt))
        if rt == "Patient":
            raise Skipped("Patient: identifier only, no event")
        if rt in ("Questionnaire", "ValueSet", "CodeSystem"):
            raise Skipped(f"{rt}: definition used for answer weights")
        if handler is None:
            raise Skipped(f"resource type {rt} not imported")
        events = handler(res)
        # Only records that made it this far open a synthesised episode (not quarantined ones).
        for ev in events:
            if str(ev.get("episode_id", "")).startswith(SYNTH_EPISODE):
                pid, when = ev["patient_id"], ev["occurred_at"]
                prev = self.first_seen.get(pid)
                if prev is None or _ts_key(when) < _ts_key(prev):
                    self.first_seen[pid] = when
        return events

    # ----- Encounter

    def encounter(self, res: dict[str, Any]) -> list[dict[str, Any]]:
        rid = f"Encounter/{res['id']}"
        status = str(res.get("status") or "")
        if status == "entered-in-error":
            raise Skipped("Encounter entered-in-error")
        event_type = self.enc_status.get(status)
        if event_type is None:
            raise Quarantined("unmapped_status", "status",
                              f"Encounter status {status!r} has no session event in the mapping")
        if self.enc_types:
            types = {c for t in res.get("type") or [] for _, c in _codes(t)}
            if not types & self.enc_types:
                raise Skipped("Encounter type not a therapy session (encounter.type_codes)")
        pid = self.patient(res.get("subject"), "subject")
        period = res.get("period") or {}
        start = self.ts(period.get("start"), "period.start")
        episode = self.episode_for(pid, res.get("episodeOfCare"))
        cls = res.get("class") or {}
        cls_codes = [cls.get("code")] if isinstance(cls, dict) else [c for _, c in _codes(cls)]
        modality = next((self.class_modality[c] for c in cls_codes if c in self.class_modality), None)
        payload: dict[str, Any] = {}
        if event_type == "session.attended":
            payload["modality"] = modality
            end = normalise_timestamp(period.get("end"), self.tz)
            if end:
                minutes = round((datetime.fromisoformat(end)
                                 - datetime.fromisoformat(start)).total_seconds() / 60)
                # Outside the contract's 1..600 (e.g. an inpatient stay): leave it out, keep the event.
                if 1 <= minutes <= 600:
                    payload["duration_minutes"] = minutes
        elif event_type == "session.scheduled":
            payload = {"scheduled_for": start, "modality": modality}
        therapist = None
        if self.therapist_from_participant:
            for part in res.get("participant") or []:
                ind = part.get("individual") or part.get("actor")
                if ref_type(ind) in ("Practitioner", "PractitionerRole"):
                    therapist = ref_id(ind)
                    if therapist:
                        break
        return [self.ev(rid, event_type, occurred_at=start, patient_id=pid, episode_id=episode,
                        session_id=f"fhir:{rid}", therapist_id=therapist, payload=payload)]

    # ----- EpisodeOfCare

    def episode_of_care(self, res: dict[str, Any]) -> list[dict[str, Any]]:
        rid = f"EpisodeOfCare/{res['id']}"
        status = str(res.get("status") or "")
        if status == "entered-in-error":
            raise Skipped("EpisodeOfCare entered-in-error")
        pid = self.patient(res.get("patient"), "patient")
        period = res.get("period") or {}
        start = self.ts(period.get("start"), "period.start")
        episode = f"fhir:{rid}"
        out = [self.ev(rid, "episode.opened", occurred_at=start, patient_id=pid,
                       episode_id=episode, payload={"age_group": self.age_group})]
        reason = (self.eoc.get("close_reason") or {}).get(status)
        end = normalise_timestamp(period.get("end"), self.tz)
        if reason and end:
            out.append(self.ev(rid, "episode.closed", occurred_at=end, patient_id=pid,
                               episode_id=episode, payload={"reason": reason}))
        return out

    # ----- QuestionnaireResponse

    def questionnaire_response(self, res: dict[str, Any]) -> list[dict[str, Any]]:
        rid = f"QuestionnaireResponse/{res['id']}"
        status = str(res.get("status") or "")
        if status in ("in-progress", "stopped"):
            raise Skipped(f"QuestionnaireResponse status {status} (not final)")
        if status not in ("completed", "amended", "entered-in-error"):
            raise Quarantined("unmapped_status", "status", f"status {status!r} unknown")
        pid = self.patient(res.get("subject"), "subject")
        when = self.ts(res.get("authored"), "authored")
        submitted_id = event_id(self.key, self.clinic, rid, "questionnaire.submitted", "")
        enc = ref_id(res.get("encounter"), "Encounter")
        session = f"fhir:Encounter/{enc}" if enc else None
        episode = self.episode_for(pid, self.idx.encounter_episodes.get(enc or ""))
        if status == "entered-in-error":
            return [self.ev(rid, "questionnaire.retracted", occurred_at=when, patient_id=pid,
                            episode_id=episode, payload={"retracts_event_id": submitted_id,
                                                         "reason": "entered_in_error"})]
        canonical = str(res.get("questionnaire") or "")
        qdef = self._questionnaire(canonical)
        qmap = self._qmap(canonical, qdef)
        ref, items_by_link, total_links = self._item_map(qmap, qdef, res)
        answers: dict[str, Any] = {}
        total = None
        for link, answer_list in _flatten_answers(res.get("item") or []):
            if link in total_links:
                total = self._total_value(answer_list, f"item[{link}]")
                continue
            item = items_by_link.get(link)
            if item is None:
                continue  # not a scored item (group header, difficulty question, free text)
            if len(answer_list) > 1:
                raise Quarantined("multiple_answers", f"item[{link}]", "more than one answer")
            answers[item] = (self._answer_weight(answer_list[0], link, qdef)
                             if answer_list else None)
        if not answers and total is None:
            raise Quarantined("missing_answers", "item", f"no scored answers for {ref.code}")
        self._check(ref, answers, total, "item")
        payload = {
            "instrument": ref.code,
            "instrument_version": str((qmap or {}).get("version") or ref.version),
            # source is who answered; author who recorded the answers (R4), e.g. a clinician
            # typing in a patient's paper PHQ-9: the respondent is still the patient
            "respondent": self._respondent(res.get("source") or res.get("author"), pid),
            "administered_at": when,
            "timing": (qmap or {}).get("timing"),
            "answers": {k: answers[k] for k in sorted(answers, key=_item_sort)} or None,
            "total": total,
        }
        if status == "amended":
            version = _version(res, when)
            payload["amends_event_id"] = submitted_id
            return [self.ev(rid, "questionnaire.amended", str(version), occurred_at=when,
                            patient_id=pid, episode_id=episode, session_id=session,
                            payload=payload)]
        return [self.ev(rid, "questionnaire.submitted", occurred_at=when, patient_id=pid,
                        episode_id=episode, session_id=session, payload=payload)]

    def _questionnaire(self, canonical: str) -> dict[str, Any] | None:
        base = canonical.split("|", 1)[0]
        q = self.idx.questionnaires.get(base)
        if q is None and "/Questionnaire/" in base:
            q = self.idx.questionnaires.get("Questionnaire/" + base.rsplit("/", 1)[-1])
        if q is None and base.startswith("Questionnaire/"):
            q = self.idx.questionnaires.get(base)
        return q

    def _qmap(self, canonical: str, qdef: dict[str, Any] | None) -> dict[str, Any] | None:
        candidates = {canonical, canonical.split("|", 1)[0]}
        if qdef is not None:
            candidates |= {str(qdef.get("url")), f"Questionnaire/{qdef.get('id')}"}
        for q in self.qmaps:
            if str(q["canonical"]) in candidates:
                return q
        return None

    def _item_map(self, qmap: dict[str, Any] | None, qdef: dict[str, Any] | None,
                  res: dict[str, Any]) -> tuple[InstrumentRef, dict[str, str], set[str]]:
        """Instrument, linkId -> item number, and the linkIds of reported totals."""
        link_codes: dict[str, set[str]] = {}  # linkId -> codes (Questionnaire item.code + linkId)
        if qdef is not None:
            for it in _walk_items(qdef.get("item") or []):
                link_codes.setdefault(str(it.get("linkId")), set()).update(
                    c for _, c in _codes(it.get("code") or []))
        for link, _ in _flatten_answers(res.get("item") or []):
            # LOINC forms use the item's code as its linkId ("/44250-9" or "44250-9").
            link_codes.setdefault(link, set()).add(link.rstrip("/").rsplit("/", 1)[-1])
        qcodes = {c for _, c in _codes((qdef or {}).get("code") or [])}
        canonical = str(res.get("questionnaire") or "")
        if qmap is not None:
            code = str(qmap["instrument"])
            ref = self.loinc.get(code) or self.refs.get(code)
            if ref is None:
                raise Quarantined("unknown_instrument", "questionnaire",
                                  f"mapping names instrument {code!r}, not in schemas/instruments")
        else:
            ref = self._detect(qcodes, canonical, link_codes)
        items: dict[str, str] = {}
        totals = {str(x) for x in (qmap or {}).get("total_link_ids") or []}
        explicit = {str(k): str(v) for k, v in ((qmap or {}).get("items") or {}).items()}
        pattern = re.compile(qmap["item_link_pattern"]) if (qmap or {}).get("item_link_pattern") else None
        ignore = {str(x) for x in (qmap or {}).get("ignore_link_ids") or []}
        for link, codes in link_codes.items():
            if link in ignore:
                continue
            if link in explicit:
                items[link] = explicit[link]
            elif ref.loinc_total and ref.loinc_total in codes:
                totals.add(link)
            elif codes & set(ref.loinc_items):
                items[link] = ref.loinc_items[next(iter(codes & set(ref.loinc_items)))]
            elif pattern and (mo := pattern.search(link)):
                items[link] = str(int(mo.group(1)))
        return ref, items, totals

    def _detect(self, qcodes: set[str], canonical: str,
                link_codes: dict[str, set[str]]) -> InstrumentRef:
        all_codes = qcodes | {c for cs in link_codes.values() for c in cs}
        for ref in self.loinc.values():
            if ref.loinc_panel and (ref.loinc_panel in qcodes or ref.loinc_panel in canonical):
                return ref
        for ref in self.loinc.values():
            if (ref.loinc_total and ref.loinc_total in all_codes) or set(ref.loinc_items) & all_codes:
                return ref
        raise Quarantined("unknown_questionnaire", "questionnaire",
                          "questionnaire is not in the mapping and carries no known LOINC codes")

    def _answer_weight(self, answer: dict[str, Any], link: str, qdef: dict[str, Any] | None) -> Any:
        for k in ("valueInteger", "valueDecimal"):
            if k in answer:
                v = number(answer[k])
                if v is None:
                    raise Quarantined("wrong_type", f"item[{link}].answer.{k}", "not a number")
                return v
        if "valueQuantity" in answer:
            return number((answer["valueQuantity"] or {}).get("value"))
        coding = answer.get("valueCoding")
        if not isinstance(coding, dict):
            kinds = [k for k in answer if k.startswith("value")]
            raise Quarantined("unmapped_answer", f"item[{link}].answer",
                              f"answer type {kinds} carries no weight")
        system, code = str(coding.get("system", "")), str(coding.get("code", ""))
        w = self._questionnaire_weight(qdef, link, system, code)
        if w is None:
            w = _weight_ext(coding)
        if w is None:
            w = self.answer_weights.get(f"{system}|{code}", self.answer_weights.get(code))
        if w is None:
            raise Quarantined("unmapped_answer", f"item[{link}].answer.valueCoding",
                              f"no weight for code {code!r} in the Questionnaire or the mapping")
        return number(w)

    def _questionnaire_weight(self, qdef: dict[str, Any] | None, link: str,
                              system: str, code: str) -> Any:
        if qdef is None:
            return None
        qitem = next((it for it in _walk_items(qdef.get("item") or [])
                      if str(it.get("linkId")) == link), None)
        if qitem is None:
            return None
        for opt in qitem.get("answerOption") or []:
            c = opt.get("valueCoding") or {}
            if _same_code(c, system, code):
                w = _weight_ext(opt)
                return w if w is not None else _weight_ext(c)
        vs_ref = str(qitem.get("answerValueSet") or "")
        vs = None
        if vs_ref.startswith("#"):
            vs = next((c for c in qdef.get("contained") or []
                       if c.get("resourceType") == "ValueSet" and c.get("id") == vs_ref[1:]), None)
        elif vs_ref:
            vs = self.idx.valuesets.get(vs_ref.split("|", 1)[0])
        if vs is None:
            return None
        for c in (vs.get("expansion") or {}).get("contains") or []:
            if _same_code(c, system, code):
                return _weight_ext(c)
        for inc in (vs.get("compose") or {}).get("include") or []:
            for c in inc.get("concept") or []:
                if str(c.get("code")) == code and (not system or not inc.get("system")
                                                   or inc.get("system") == system):
                    return _weight_ext(c)
        return None

    def _total_value(self, answer_list: list[dict[str, Any]], where: str) -> Any:
        if not answer_list:
            return None
        a = answer_list[0]
        v = number((a.get("valueQuantity") or {}).get("value")) if "valueQuantity" in a else None
        for k in ("valueInteger", "valueDecimal"):
            if k in a:
                v = number(a[k])
        if v is None:
            raise Quarantined("wrong_type", where, "reported total is not a number")
        return v

    def _respondent(self, who: Any, pid: str) -> str:
        kind = ref_type(who)
        table = self.m.get("respondent_by_author") or {}
        return str(table.get(kind, "patient")) if kind else "patient"

    def _check(self, ref: InstrumentRef, answers: dict[str, Any], total: Any, field_name: str) -> None:
        """Range checks up front, so errors name the FHIR file and line (the ingest checks again)."""
        check_answers(ref, answers, total, lambda item: f"{field_name}[{item}]", "total")

    # ----- Observation

    def observation(self, res: dict[str, Any]) -> list[dict[str, Any]]:
        rid = f"Observation/{res['id']}"
        codes = {c for _, c in _codes(res.get("code"))}
        totals_extra = {str(k): str(v) for k, v in (self.m.get("observation_totals") or {}).items()}
        panel_ref = next((r for r in self.loinc.values() if r.loinc_panel in codes), None)
        total_ref = next((r for r in self.loinc.values() if r.loinc_total and r.loinc_total in codes),
                         None)
        if total_ref is None and codes & set(totals_extra):
            code = totals_extra[next(iter(codes & set(totals_extra)))]
            total_ref = self.refs.get(code)
            if total_ref is None:
                raise Quarantined("unknown_instrument", "code",
                                  f"observation_totals names {code!r}, not in schemas/instruments")
        item_ref = next((r for r in self.loinc.values() if codes & set(r.loinc_items)), None)
        if panel_ref is None and total_ref is None:
            if item_ref is not None:
                if str(res["id"]) in self.idx.panel_members:
                    raise Skipped("item Observation carried by its panel")
                raise Skipped("single item Observation without a panel")
            raise Skipped("Observation code not a mapped score")
        if panel_ref is None and str(res["id"]) in self.idx.panel_members:
            raise Skipped("total Observation carried by its panel")
        status = str(res.get("status") or "")
        if status in ("registered", "preliminary", "cancelled"):
            raise Skipped(f"Observation status {status} (not final)")
        pid = self.patient(res.get("subject"), "subject")
        when = self.ts(res.get("effectiveDateTime") or (res.get("effectivePeriod") or {}).get("start")
                       or res.get("issued"), "effectiveDateTime")
        enc = ref_id(res.get("encounter"), "Encounter")
        episode = self.episode_for(pid, self.idx.encounter_episodes.get(enc or ""))
        submitted_id = event_id(self.key, self.clinic, rid, "questionnaire.submitted", "")
        if status == "entered-in-error":
            return [self.ev(rid, "questionnaire.retracted", occurred_at=when, patient_id=pid,
                            episode_id=episode, payload={"retracts_event_id": submitted_id,
                                                         "reason": "entered_in_error"})]
        ref = panel_ref or total_ref
        assert ref is not None
        answers: dict[str, Any] = {}
        total = None
        if panel_ref is None:
            total = _obs_value(res, self.answer_weights, "value")
            if total is None:
                raise Quarantined("missing_field", "value", f"{ref.code} total without a value")
        else:
            parts = [(f"component[{i}]", c) for i, c in enumerate(res.get("component") or [])]
            for m in res.get("hasMember") or []:
                mid = ref_id(m, "Observation")
                if mid and mid in self.idx.observations:
                    parts.append((f"hasMember[Observation/{mid}]", self.idx.observations[mid]))
            for where, part in parts:
                pcodes = {c for _, c in _codes(part.get("code"))}
                if ref.loinc_total and ref.loinc_total in pcodes:
                    total = _obs_value(part, self.answer_weights, where)
                elif pcodes & set(ref.loinc_items):
                    item = ref.loinc_items[next(iter(pcodes & set(ref.loinc_items)))]
                    answers[item] = _obs_value(part, self.answer_weights, where)
            if total is None:
                total = _obs_value(res, self.answer_weights, "value", required=False)
            if not answers and total is None:
                raise Quarantined("missing_answers", "component",
                                  f"{ref.code} panel without item or total values")
        self._check(ref, answers, total, "component")
        payload = {
            "instrument": ref.code,
            "instrument_version": ref.version,
            "respondent": "patient",
            "administered_at": when,
            "answers": {k: answers[k] for k in sorted(answers, key=_item_sort)} or None,
            "total": total,
        }
        session = f"fhir:Encounter/{enc}" if enc else None
        if status in ("amended", "corrected"):
            # A correction of a score already sent: a new event that amends it, as for an
            # amended QuestionnaireResponse (the same event id with other content would be
            # quarantined as a conflicting duplicate and the correction lost).
            version = _version(res, res.get("issued") or when)
            payload["amends_event_id"] = submitted_id
            return [self.ev(rid, "questionnaire.amended", str(version), occurred_at=when,
                            patient_id=pid, episode_id=episode, session_id=session,
                            payload=payload)]
        return [self.ev(rid, "questionnaire.submitted", occurred_at=when, patient_id=pid,
                        episode_id=episode, session_id=session, payload=payload)]

    # ----- synthesised episodes

    def synthesised_episodes(self) -> list[dict[str, Any]]:
        out = []
        for pid, first in sorted(self.first_seen.items()):
            # One episode per patient and import source; the event id hashes the patient id.
            out.append(make_event(
                event_id=event_id(self.key, self.clinic, "episode-of", pid, "episode.opened"),
                event_type="episode.opened", occurred_at=first, source=self.source,
                clinic_id=self.clinic, patient_id=pid, episode_id=f"{SYNTH_EPISODE}{pid}",
                payload={"age_group": self.age_group}))
        return out


def _version(res: dict[str, Any], when: str) -> str:
    """What tells one amendment of a resource from another, for its event id: meta.versionId,
    else meta.lastUpdated, else the time with a hash of the content (the time alone gave two
    amendments without meta the same id, and the second was quarantined as a conflict)."""
    meta = res.get("meta") or {}
    if meta.get("versionId") or meta.get("lastUpdated"):
        return str(meta.get("versionId") or meta.get("lastUpdated"))
    digest = hashlib.sha256(json.dumps(res, sort_keys=True).encode()).hexdigest()[:12]
    return f"{when}|{digest}"


def _same_code(coding: dict[str, Any], system: str, code: str) -> bool:
    if str(coding.get("code")) != code:
        return False
    return not system or not coding.get("system") or coding.get("system") == system


def _walk_items(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for it in items:
        yield it
        yield from _walk_items(it.get("item") or [])


def _flatten_answers(items: list[dict[str, Any]]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(linkId, answers) of every answered item, also those nested under groups and answers."""
    for it in items:
        answers = it.get("answer") or []
        if answers:
            yield str(it.get("linkId")), answers
        yield from _flatten_answers(it.get("item") or [])
        for a in answers:
            yield from _flatten_answers(a.get("item") or [])


def _obs_value(part: dict[str, Any], weights: dict[str, Any], where: str,
               required: bool = True) -> Any:
    if part.get("valueInteger") is not None:
        return number(part["valueInteger"])
    if part.get("valueDecimal") is not None:
        return number(part["valueDecimal"])
    if part.get("valueQuantity"):
        return number(part["valueQuantity"].get("value"))
    cc = part.get("valueCodeableConcept")
    if cc:
        for coding in cc.get("coding") or []:
            w = _weight_ext(coding)
            if w is None:
                w = weights.get(f"{coding.get('system', '')}|{coding.get('code')}",
                                weights.get(str(coding.get("code"))))
            if w is not None:
                return number(w)
        raise Quarantined("unmapped_answer", f"{where}.valueCodeableConcept",
                          "no weight for the coded value in the mapping's answer_weights")
    if required:
        raise Quarantined("missing_field", f"{where}.value", "no value")
    return None


def _item_sort(k: str) -> tuple[int, str]:
    return (int(k), k) if k.isdigit() else (10**6, k)


def _ts_key(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


def _label(rec: Record) -> str:
    res = rec.resource or {}
    return f"{res.get('resourceType', '?')}/{res.get('id', '?')}" if res else ""


def import_fhir(inputs: list[Path] | Path, mapping: dict[str, Any] | str | Path = DEFAULT_MAPPING,
                *, clinic_id: str | None = None, key: bytes | None = None) -> ImportResult:
    """Convert FHIR files (or folders of them) into canonical events, accounting for every record.

    `key`: the platform key for event ids (default: `alliance.pseudonyms.platform_key()`)."""
    paths = fhir_files([Path(p) for p in (inputs if isinstance(inputs, list) else [inputs])])
    m = mapping if isinstance(mapping, dict) else load_mapping(mapping, "fhir")
    imp = FhirImporter(m, clinic_id, key)
    imp.idx = build_index(paths, m)
    result = ImportResult("fhir")
    for path in paths:
        result.account(str(path))
        for rec in iter_records(path):
            result.read(rec.path)
            if rec.blank:
                result.skip(rec.path, "blank line")
                continue
            if rec.error is not None:
                result.reject(rec.path, rec.line, rec.error)
                continue
            assert rec.resource is not None
            try:
                events = imp.convert(rec.resource)
            except Skipped as s:
                result.skip(rec.path, s.reason)
            except Quarantined as q:
                result.reject(rec.path, rec.line, q, _label(rec))
            except (AttributeError, TypeError, KeyError, ValueError, IndexError) as e:
                # A resource of a shape FHIR does not allow (a string where an object or list
                # belongs, ...): that record is quarantined, not the import lost. Only the error's
                # kind is kept: its text may quote the record's content.
                result.reject(rec.path, rec.line, Quarantined(
                    "malformed_resource", "", f"{rec.resource.get('resourceType', 'resource')} "
                    f"has an element of an unexpected shape ({type(e).__name__})"), _label(rec))
            else:
                result.produce(rec.path, events)
    synth = imp.synthesised_episodes()
    result.events.extend(synth)
    result.synthesised = len(synth)
    return result


def import_fhir_to_landing(inputs: list[Path] | Path, mapping: dict[str, Any] | str | Path,
                           out_dir: Path, *, clinic_id: str | None = None,
                           key: bytes | None = None) -> ImportResult:
    """Import and write `<stem>.ndjson` into a landing folder (quarantine, summary: report_dir)."""
    m = mapping if isinstance(mapping, dict) else load_mapping(mapping, "fhir")
    m = with_clinic(m, clinic_id)
    paths = [Path(p) for p in (inputs if isinstance(inputs, list) else [inputs])]
    result = import_fhir(paths, m, key=key)
    return write_landing(result, Path(out_dir), output_stem("fhir", paths, m, key))
