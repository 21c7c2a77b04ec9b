"""Interoperability: FHIR R4, REDCap and research-CSV imports into canonical events; Parquet export."""

from __future__ import annotations

import csv
import functools
import json
import re
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow
import pytest
from conftest import IMPORT_KEY, REF_REMEDY, require_present

from alliance.importers.common import Quarantined
from alliance.importers.fhir import import_fhir, import_fhir_to_landing
from alliance.importers.redcap import import_redcap
from alliance.importers.wide_csv import import_wide_csv, import_wide_csv_to_landing

# every import in this module makes its event ids with the test key
import_fhir = functools.partial(import_fhir, key=IMPORT_KEY)
import_fhir_to_landing = functools.partial(import_fhir_to_landing, key=IMPORT_KEY)
import_redcap = functools.partial(import_redcap, key=IMPORT_KEY)
import_wide_csv = functools.partial(import_wide_csv, key=IMPORT_KEY)
import_wide_csv_to_landing = functools.partial(import_wide_csv_to_landing, key=IMPORT_KEY)

REF = Path(__file__).resolve().parents[2] / "shared" / "reference"
needs_ref = pytest.mark.usefixtures("reference_present")


@pytest.fixture()
def reference_present() -> None:
    require_present(REF, "the reference data folder (../shared/reference)", REF_REMEDY)
PHQ9_LOINC = ["44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5",
              "44253-3", "44260-8"]
LA = {0: "LA6568-5", 1: "LA6569-3", 2: "LA6570-1", 3: "LA6571-9"}


def by_type(events: list[dict], t: str) -> list[dict]:
    return [e for e in events if e["event_type"] == t]


# --------------------------------------------------------------------------- reference data


@needs_ref
def test_hl7_sdc_phq9_scores_with_the_questionnaires_own_weights() -> None:
    res = import_fhir(REF / "fhir" / "hl7_sdc_phq9", "fhir.yaml")
    assert res.balanced and not res.quarantine
    [sub] = by_type(res.events, "questionnaire.submitted")
    p = sub["payload"]
    assert p["instrument"] == "PHQ-9"
    # By hand from the response's codes and the contained ValueSet's ordinalValue weights:
    # Q1-3 Not-at-all (0), Q4 Several-days (1), Q5 More than half (2), Q6 Several (1),
    # Q7 Nearly every day (3), Q8 More than half (2), Q9 Several (1).
    assert p["answers"] == {"1": 0, "2": 0, "3": 0, "4": 1, "5": 2, "6": 1, "7": 3, "8": 2, "9": 1}
    assert sum(p["answers"].values()) == 10
    # The example reports 13 (item H1/TS, LOINC 44261-6): carried so scoring flags the mismatch.
    assert p["total"] == 13
    assert sub["occurred_at"] == "2019-08-21T20:36:57.544000+00:00"
    assert "proband" not in sub["event_id"]
    assert len(by_type(res.events, "episode.opened")) == 1


@pytest.fixture(scope="module")
def synthea():
    return import_fhir(REF / "fhir" / "synthea_10_patients", "fhir.yaml")


@needs_ref
def test_synthea_encounters_become_sessions_and_every_line_is_accounted_for(synthea) -> None:
    folder = REF / "fhir" / "synthea_10_patients"
    lines = {str(p): sum(1 for _ in open(p)) for p in folder.glob("*.ndjson")}
    summary = synthea.summary()
    for f in summary["files"]:
        assert f["records_read"] == lines[f["path"]]
        assert f["records_read"] == (f["produced_events_from"] + sum(f["skipped"].values())
                                     + sum(f["quarantined"].values()))
    enc = lines[str(folder / "Encounter.000.ndjson")]
    attended = by_type(synthea.events, "session.attended")
    assert len(attended) == enc  # all Synthea encounters are 'finished'
    assert {e["payload"].get("modality") for e in attended} <= {"in_person", "video", None}
    patients = {e["patient_id"] for e in attended}
    opened = by_type(synthea.events, "episode.opened")
    assert {e["patient_id"] for e in opened} == patients
    # Each synthesised episode opens at its patient's first encounter (compare as instants).
    from datetime import datetime

    for o in opened:
        first = min(datetime.fromisoformat(a["occurred_at"]) for a in attended
                    if a["patient_id"] == o["patient_id"])
        assert datetime.fromisoformat(o["occurred_at"]) == first


@needs_ref
def test_synthea_output_holds_no_names_or_addresses(synthea, tmp_path) -> None:
    folder = REF / "fhir" / "synthea_10_patients"
    res = import_fhir_to_landing(folder, "fhir.yaml", tmp_path)
    text = res.events_path.read_text() + res.quarantine_path.read_text()
    for line in open(folder / "Patient.000.ndjson"):
        pat = json.loads(line)
        for n in pat.get("name", []):
            assert n["family"] not in text
        for a in pat.get("address", []):
            assert a["line"][0] not in text
        assert pat["id"] not in "".join(e["event_id"] for e in res.events)


def _non_missing(path: Path, cols: list[str], where=lambda r: True) -> int:
    with open(path) as f:
        return sum(1 for r in csv.DictReader(f) if where(r)
                   for c in cols if r[c].strip() not in ("", "NA"))


@needs_ref
def test_sgdata_wide_csv_imports_one_event_per_score() -> None:
    path = REF / "suddengains" / "sgdata.csv"
    res = import_wide_csv(path, "sgdata.yaml")
    subs = by_type(res.events, "questionnaire.submitted")
    assert len(subs) == _non_missing(path, [f"bdi_s{i}" for i in range(13)])
    assert {e["payload"]["instrument"] for e in subs} == {"BDI-II"}
    assert res.balanced and not res.quarantine
    assert len(by_type(res.events, "episode.opened")) == 43
    # Patient 1 baseline is 33 (s0), placed at the anchor as intake.
    s0 = next(e for e in subs if e["patient_id"] == "1" and e["payload"]["timing"] == "intake")
    assert s0["payload"]["total"] == 33


@needs_ref
def test_claus_2020_long_csv_imports_one_event_per_score() -> None:
    path = REF / "clinicalsignificance" / "claus_2020.csv"
    res = import_wide_csv(path, "claus_2020.yaml")
    subs = by_type(res.events, "questionnaire.submitted")
    assert len(subs) == _non_missing(path, ["bdi"])
    assert res.files[str(path)].records_read == 172
    assert res.balanced and not res.quarantine


# --------------------------------------------------------------------------- synthetic FHIR


def _phq9_qr(qid: str, pid: str, scores: list[int], total: int | None, status="completed") -> dict:
    items = [{"linkId": f"/{code}", "answer": [{"valueCoding": {"system": "http://loinc.org",
                                                                "code": LA[s]}}]}
             for code, s in zip(PHQ9_LOINC, scores, strict=True)]
    items.append({"linkId": "/69722-7", "answer": [{"valueCoding": {"code": "LA6572-7"}}]})
    if total is not None:
        items.append({"linkId": "/44261-6", "answer": [{"valueDecimal": total}]})
    return {"resourceType": "QuestionnaireResponse", "id": qid, "status": status,
            "questionnaire": "http://loinc.org/q/44249-1", "subject": {"reference": f"Patient/{pid}"},
            "encounter": {"reference": "Encounter/e1"},
            "authored": "2024-03-01T10:00:00+01:00", "item": [{"linkId": "/44249-1", "item": items}]}


def _write_ndjson(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_fhir_loinc_coded_resources_encounter_statuses_and_quarantine(tmp_path) -> None:
    patient = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Secretname"}],
               "identifier": [{"system": "urn:mrn", "value": "MRN-77"},
                              {"system": "urn:ssn", "value": "123-45-6789"}],
               "address": [{"line": ["1 Hidden Street"]}]}
    enc = lambda i, st: {"resourceType": "Encounter", "id": i, "status": st,  # noqa: E731
                         "class": {"code": "VR"}, "subject": {"reference": "Patient/p1"},
                         "period": {"start": f"2024-03-0{i[-1]}T10:00:00+01:00",
                                    "end": f"2024-03-0{i[-1]}T10:50:00+01:00"}}
    obs_total = {"resourceType": "Observation", "id": "o1", "status": "final",
                 "code": {"coding": [{"system": "http://loinc.org", "code": "70274-6"}]},
                 "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2024-03-02",
                 "valueQuantity": {"value": 12}}
    panel = {"resourceType": "Observation", "id": "o2", "status": "final",
             "code": {"coding": [{"system": "http://loinc.org", "code": "44249-1"}]},
             "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2024-03-03T09:00:00Z",
             "component": [{"code": {"coding": [{"code": c}]}, "valueInteger": 1}
                           for c in PHQ9_LOINC]
             + [{"code": {"coding": [{"code": "44261-6"}]}, "valueInteger": 9}]}
    vitals = {"resourceType": "Observation", "id": "o3", "status": "final",
              "code": {"coding": [{"code": "8867-4"}]}, "subject": {"reference": "Patient/p1"}}
    f = _write_ndjson(tmp_path / "export.ndjson", [
        patient, enc("e1", "finished"), enc("e2", "cancelled"), enc("e3", "noshow"),
        enc("e4", "planned"), enc("e5", "in-progress"),
        _phq9_qr("q1", "p1", [0, 1, 2, 3, 0, 1, 2, 3, 1], 13),
        _phq9_qr("q2", "p1", [0] * 9, None, status="in-progress"),
        {**_phq9_qr("q3", "p1", [0] * 9, None), "item": [{"linkId": "/44250-9", "answer": [
            {"valueCoding": {"code": "LA-unknown"}}]}]},
        obs_total, panel, vitals, "{not json", "",
    ])
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:q9", "resource": {k: v for k, v in _phq9_qr("x", "p1", [3] * 9, 27)
                                                .items() if k != "id"}}]}
    b = tmp_path / "bundle.json"
    b.write_text(json.dumps(bundle))
    m = {"kind": "fhir", "clinic_id": "c1", "patient_identifier_system": "urn:mrn",
         "encounter": {"status": {"finished": "session.attended", "cancelled": "session.cancelled",
                                  "noshow": "session.no_show", "planned": "session.scheduled"},
                       "class_modality": {"VR": "video"}},
         "answer_weights": {"http://loinc.org|LA6568-5": 0, "http://loinc.org|LA6569-3": 1,
                            "http://loinc.org|LA6570-1": 2, "http://loinc.org|LA6571-9": 3}}
    res = import_fhir([tmp_path / "export.ndjson", b], m)
    assert res.balanced
    acc = res.files[str(f)]
    assert acc.records_read == 14
    types = [e["event_type"] for e in res.events]
    assert types.count("session.attended") == 1 and types.count("session.cancelled") == 1
    assert types.count("session.no_show") == 1 and types.count("session.scheduled") == 1
    att = by_type(res.events, "session.attended")[0]
    assert att["payload"] == {"modality": "video", "duration_minutes": 50}
    assert att["patient_id"] == "MRN-77"  # the configured identifier, nothing else
    subs = {e["payload"].get("total"): e for e in by_type(res.events, "questionnaire.submitted")}
    assert subs[13]["payload"]["answers"] == {str(i + 1): v for i, v in
                                              enumerate([0, 1, 2, 3, 0, 1, 2, 3, 1])}
    assert subs[13]["session_id"] == "fhir:Encounter/e1"
    assert subs[12]["payload"] == {"instrument": "GAD-7", "instrument_version": "1",
                                   "respondent": "patient", "total": 12,
                                   "administered_at": "2024-03-02T00:00:00+00:00"}
    assert subs[9]["payload"]["answers"] == {str(i): 1 for i in range(1, 10)}
    assert subs[27]["payload"]["answers"]["9"] == 3  # from the Bundle
    reasons = {(q["reason"], q["line"]) for q in res.quarantine}
    assert reasons == {("unmapped_status", 6), ("unmapped_answer", 9), ("malformed_json", 13)}
    assert acc.skipped["Patient: identifier only, no event"] == 1
    assert acc.skipped["blank line"] == 1
    text = json.dumps(res.events) + json.dumps(res.quarantine)
    for secret in ("Secretname", "123-45-6789", "Hidden Street"):
        assert secret not in text


def test_questionnaire_retraction_and_amendment(tmp_path) -> None:
    qr = _phq9_qr("q1", "p1", [1] * 9, None)
    f = _write_ndjson(tmp_path / "a.ndjson", [
        qr, {**qr, "status": "amended", "meta": {"versionId": "2"}},
        {**qr, "status": "entered-in-error"}])
    res = import_fhir(f, {"kind": "fhir", "clinic_id": "c1", "answer_weights": {"LA6569-3": 1}})
    sub = by_type(res.events, "questionnaire.submitted")[0]
    assert by_type(res.events, "questionnaire.amended")[0]["payload"]["amends_event_id"] == sub["event_id"]
    # two amendments without meta: told apart by their content, not only by `authored`
    a1 = {**qr, "status": "amended"}
    a2 = {**_phq9_qr("q1", "p1", [1] * 8 + [0], None), "status": "amended"}
    both = import_fhir(_write_ndjson(tmp_path / "b.ndjson", [a1, a2]),
                       {"kind": "fhir", "clinic_id": "c1", "answer_weights": {"LA6568-5": 0, "LA6569-3": 1}})
    ids = [e["event_id"] for e in by_type(both.events, "questionnaire.amended")]
    assert len(ids) == 2 and len(set(ids)) == 2
    assert by_type(res.events, "questionnaire.retracted")[0]["payload"]["retracts_event_id"] == sub["event_id"]


def test_fhir_scores_join_their_encounters_episode_respondent_is_the_source(tmp_path) -> None:
    """A response naming an Encounter of an EpisodeOfCare belongs to that episode (not to a
    synthesised one with no sessions); the respondent is whoever answered (source), not who
    typed it in (author); a corrected score Observation amends the original instead of being
    quarantined at ingest as a conflicting duplicate."""
    eoc = {"resourceType": "EpisodeOfCare", "id": "eoc1", "status": "active",
           "patient": {"reference": "Patient/p1"}, "period": {"start": "2024-02-01T09:00:00Z"}}
    enc = {"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "AMB"},
           "subject": {"reference": "Patient/p1"}, "episodeOfCare": [{"reference": "EpisodeOfCare/eoc1"}],
           "period": {"start": "2024-03-01T09:00:00Z", "end": "2024-03-01T09:50:00Z"}}
    qr = {**_phq9_qr("q1", "p1", [1] * 9, None), "author": {"reference": "Practitioner/dr1"},
          "source": {"reference": "Patient/p1"}}
    obs = {"resourceType": "Observation", "id": "o1", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "70274-6"}]},
           "subject": {"reference": "Patient/p1"}, "encounter": {"reference": "Encounter/e1"},
           "effectiveDateTime": "2024-03-01T09:55:00Z", "valueInteger": 21}
    m = {"kind": "fhir", "clinic_id": "c1", "answer_weights": {"LA6569-3": 1},
         "encounter": {"status": {"finished": "session.attended"}},
         "respondent_by_author": {"Patient": "patient", "Practitioner": "therapist"}}
    f = _write_ndjson(tmp_path / "a.ndjson", [eoc, enc, qr, obs])
    res = import_fhir(f, m)
    assert {e["episode_id"] for e in res.events} == {"fhir:EpisodeOfCare/eoc1"}
    assert len(by_type(res.events, "episode.opened")) == 1  # no synthesised second episode
    sub = {e["payload"]["instrument"]: e for e in by_type(res.events, "questionnaire.submitted")}
    assert sub["PHQ-9"]["payload"]["respondent"] == "patient"
    corrected = {**obs, "status": "corrected", "valueInteger": 12, "meta": {"versionId": "2"}}
    res2 = import_fhir(_write_ndjson(tmp_path / "b.ndjson", [eoc, enc, corrected]), m)
    [amended] = by_type(res2.events, "questionnaire.amended")
    assert amended["payload"]["amends_event_id"] == sub["GAD-7"]["event_id"]
    assert amended["payload"]["total"] == 12 and amended["event_id"] != sub["GAD-7"]["event_id"]
    assert not by_type(res2.events, "questionnaire.submitted")


# --------------------------------------------------------------------------- REDCap


def _redcap_fixture(tmp_path: Path) -> tuple[Path, Path]:
    """A small longitudinal REDCap project: PHQ-9 per event, GAD-7 as a repeating instrument."""
    choices = "0, Not at all | 1, Several days | 2, More than half the days | 3, Nearly every day"
    dd = [["Variable / Field Name", "Form Name", "Section Header", "Field Type", "Field Label",
           "Choices, Calculations, OR Slider Labels"],
          ["record_id", "demographics", "", "text", "Record ID", ""],
          ["phq9_date", "phq9", "", "text", "Date", ""]]
    dd += [[f"phq9_{i}", "phq9", "", "checkbox" if i == 9 else "radio", f"Item {i}", choices]
           for i in range(1, 10)]
    dd += [["phq9_total", "phq9", "", "calc", "Total", "sum(...)"],
           ["gad7_date", "gad7", "", "text", "Date", ""]]
    dd += [[f"gad7_{i}", "gad7", "", "dropdown", f"Item {i}", choices] for i in range(1, 8)]
    dd += [["gad7_total", "gad7", "", "calc", "Total", ""]]
    d = tmp_path / "dictionary.csv"
    with open(d, "w", newline="") as f:
        csv.writer(f).writerows(dd)
    cols = (["record_id", "redcap_event_name", "redcap_repeat_instrument", "redcap_repeat_instance",
             "phq9_date"] + [f"phq9_{i}" for i in range(1, 9)]
            + [f"phq9_9___{c}" for c in range(4)] + ["phq9_total", "phq9_complete", "gad7_date"]
            + [f"gad7_{i}" for i in range(1, 8)] + ["gad7_total", "gad7_complete"])

    def row(rec, event, rinst="", rn="", phq=None, tick=None, ptot="", pc="", gad=None, gd="",
            gc=""):
        phq = phq or [""] * 8
        boxes = ["1" if tick == c else "0" for c in range(4)] if tick is not None else ["0"] * 4
        if isinstance(tick, list):
            boxes = ["1" if c in tick else "0" for c in range(4)]
        gad = gad or [""] * 7
        return ([rec, event, rinst, rn, "2024-01-10" if pc else ""] + phq + boxes + [ptot, pc, gd]
                + gad + [sum(int(x) for x in gad if x) if gc else "", gc])

    rows = [
        row("101", "baseline_arm_1", phq=list("01230123"), tick=2, ptot="14", pc="2"),
        row("101", "week_4_arm_1", phq=list("00000000"), tick=None, ptot="0", pc="2"),
        row("101", "week_4_arm_1", "gad7", "1", gad=list("1111111"), gd="2024-02-01", gc="2"),
        row("101", "week_4_arm_1", "gad7", "2", gad=list("2222222"), gd="2024-02-08", gc="2"),
        row("102", "baseline_arm_1", phq=list("11111111"), tick=[1, 2], ptot="10", pc="2"),
        row("103", "baseline_arm_1", phq=list("11111111"), tick=1, ptot="9", pc="1"),
        row("104", "baseline_arm_1", phq=list("1111111") + ["7"], tick=1, ptot="9", pc="2"),
    ]
    e = tmp_path / "export.csv"
    with open(e, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
    return e, d


def test_redcap_export_with_dictionary_checkboxes_events_and_repeats(tmp_path) -> None:
    export, dictionary = _redcap_fixture(tmp_path)
    res = import_redcap(export, dictionary, "redcap.yaml", clinic_id="rc1")
    assert res.balanced
    acc = res.files[str(export)]
    assert acc.records_read == 7 and acc.produced == 4
    subs = by_type(res.events, "questionnaire.submitted")
    phq = [e for e in subs if e["payload"]["instrument"] == "PHQ-9"]
    gad = [e for e in subs if e["payload"]["instrument"] == "GAD-7"]
    assert len(phq) == 2 and len(gad) == 2
    base = next(e for e in phq if e["payload"]["timing"] == "intake")
    assert base["payload"]["answers"] == {"1": 0, "2": 1, "3": 2, "4": 3, "5": 0, "6": 1, "7": 2,
                                          "8": 3, "9": 2}  # item 9 from the ticked checkbox
    assert base["payload"]["total"] == 14
    assert base["session_id"] == "redcap:101:baseline_arm_1"
    week4 = next(e for e in phq if e is not base)
    assert week4["payload"]["answers"]["9"] is None  # no box ticked: a missing item
    assert {e["session_id"] for e in gad} == {"redcap:101:week_4_arm_1:1", "redcap:101:week_4_arm_1:2"}
    assert len({e["event_id"] for e in gad}) == 2
    reasons = {(q["line"], q["reason"]) for q in res.quarantine}
    assert reasons == {(6, "multiple_answers"), (8, "invalid_value")}  # 7 is not a choice
    assert acc.skipped == {"no complete mapped form on the row": 1}  # 103: form not complete
    assert by_type(res.events, "episode.opened")[0]["patient_id"] == "101"


def test_redcap_repeating_events_difficulty_field_and_total_range(tmp_path) -> None:
    """Instances of a repeating event are separate events (the first keeps its old id); a
    'phq9_10' difficulty field is not an item; a total outside the instrument's range is
    quarantined at import, naming the CSV line and field, not at ingest."""
    export, dictionary = _redcap_fixture(tmp_path)
    with open(dictionary, "a", newline="") as f:
        csv.writer(f).writerow(["phq9_10", "phq9", "", "radio", "Difficulty",
                                "0, Not difficult | 1, Somewhat | 2, Very | 3, Extremely"])
    with open(export, newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0] + ["phq9_10"]
    body = [r + ["1"] for r in rows[1:2]]  # record 101 baseline, difficulty answered
    weekly = dict(zip(rows[0], rows[2], strict=True))  # a PHQ-9 at week 4: repeat it twice
    for inst, total in (("1", "0"), ("2", "99")):
        r = {**weekly, "redcap_event_name": "weekly_arm_1", "redcap_repeat_instance": inst,
             "phq9_total": total}
        body.append([r[c] for c in rows[0]] + [""])
    with open(export, "w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    res = import_redcap(export, dictionary, "redcap.yaml", clinic_id="rc1")
    assert res.balanced
    phq = [e for e in by_type(res.events, "questionnaire.submitted")
           if e["payload"]["instrument"] == "PHQ-9"]
    assert [sorted(e["payload"]["answers"]) for e in phq] == [sorted(str(i) for i in range(1, 10))] * 2
    assert [(q["line"], q["reason"], q["field"]) for q in res.quarantine] == [
        (4, "answer_out_of_range", "phq9_total")]
    # instance 1 of the repeating event keeps the id a non-repeating event had
    from alliance.importers.common import event_id

    weekly1 = next(e for e in phq if e["occurred_at"] and e["payload"]["total"] == 0)
    assert weekly1["event_id"] == event_id(IMPORT_KEY, "rc1", "redcap", "101", "weekly_arm_1", "phq9", "")
    res2 = import_redcap(export, dictionary, "redcap.yaml", clinic_id="rc1")
    assert [e["event_id"] for e in res2.events] == [e["event_id"] for e in res.events]
    # instance 2 with a valid total: its own event
    body[-1][header.index("phq9_total")] = "0"
    with open(export, "w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    res3 = import_redcap(export, dictionary, "redcap.yaml", clinic_id="rc1")
    weekly = [e for e in by_type(res3.events, "questionnaire.submitted")
              if e["payload"]["instrument"] == "PHQ-9" and e["payload"]["timing"] != "intake"]
    assert len({e["event_id"] for e in weekly}) == 2 and not res3.quarantine


def test_csv_rows_that_conflict_or_hold_text_are_quarantined_without_their_content(tmp_path) -> None:
    """Two rows for the same patient and time point with other values conflict: the second is
    quarantined at import naming the first line (at ingest it was a conflicting duplicate in the
    landing file). A cell of free text is described, never copied into the report."""
    f = tmp_path / "w.csv"
    f.write_text("id,bdi_s1,bdi_s2\nA1,20,18\nA2,25,Called John Smith 555-1234\nA1,20,15\nA3,10,9\n")
    m = {"kind": "wide_csv", "clinic_id": "c1", "id_column": "id",
         "scores": [{"instrument": "BDI-II", "column_pattern": r"^bdi_s(\d+)$"}]}
    res = import_wide_csv_to_landing(f, m, tmp_path / "landing")
    assert res.balanced
    reasons = {(q["line"], q["reason"]) for q in res.quarantine}
    assert reasons == {(3, "wrong_type"), (4, "conflicting_duplicate")}
    conflict = next(q for q in res.quarantine if q["reason"] == "conflicting_duplicate")
    assert "w.csv line 2" in conflict["message"]
    report = res.quarantine_path.read_text()
    assert "John" not in report and "555" not in report
    assert "text, 26 characters" in report


def test_mapping_values_are_checked_when_the_mapping_loads(tmp_path) -> None:
    """A bad time zone, date, number or pattern in a mapping is a MappingError naming the key
    (a one-line error with exit 2 from the CLI), not a traceback later."""
    from alliance.importers.common import MappingError
    from alliance.importers.fhir import FhirImporter
    from alliance.importers.wide_csv import CsvImporter

    base = {"kind": "wide_csv", "clinic_id": "c1", "id_column": "id",
            "scores": [{"instrument": "PHQ-9", "column_pattern": r"^phq_(\d+)$"}]}
    for change, key in (({"timezone": "Europe/Berln"}, "timezone"),
                        ({"timezone": "Europe"}, "timezone"),  # (a folder: it was a traceback)
                        ({"anchor_date": "06/01/2020"}, "anchor_date"),
                        ({"first_session": "one"}, "first_session"),
                        ({"interval_days": 0}, "interval_days"),
                        ({"scores": [{"instrument": "PHQ-9", "column_pattern": "phq_(\\d+"}]},
                         "scores[0].column_pattern")):
        with pytest.raises(MappingError, match=rf"key '{re.escape(key)}'"):
            CsvImporter({**base, **change})
    with pytest.raises(MappingError, match="key 'timezone'"):
        FhirImporter({"kind": "fhir", "clinic_id": "c1", "timezone": "Mars/Base"})


# --------------------------------------------------------------------------- CLI and landing


def test_cli_writes_canonical_ndjson_into_landing_reproducibly(tmp_path, monkeypatch, capsys) -> None:
    from orchestration.cli import main

    monkeypatch.setenv("ALLIANCE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("ALLIANCE_PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("ALLIANCE_DEMO", raising=False)
    src = _write_ndjson(tmp_path / "in.ndjson", [_phq9_qr("q1", "p1", [1] * 9, 9)])
    # event ids are keyed like the pseudonyms: no key, no import (and nothing written)
    assert main(["import", "fhir", str(src), "--mapping", "fhir.yaml", "--clinic", "c-1"]) == 2
    assert "ALLIANCE_PSEUDONYM_KEY is not set" in capsys.readouterr().err
    assert not list((tmp_path / "data" / "landing").glob("*.ndjson"))
    monkeypatch.setenv("ALLIANCE_PSEUDONYM_KEY", IMPORT_KEY.decode())
    assert main(["import", "fhir", str(src), "--mapping", "fhir.yaml", "--clinic", "c-1"]) == 0
    landing = tmp_path / "data" / "landing"
    [out] = list(landing.glob("*.ndjson"))
    first = out.read_bytes()
    assert main(["import", "fhir", str(src), "--mapping", "fhir.yaml", "--clinic", "c-1"]) == 0
    assert out.read_bytes() == first  # same input -> same file -> the ingest sees no change
    events = [json.loads(x) for x in first.decode().splitlines()]
    assert {e["clinic_id"] for e in events} == {"c-1"}
    # the import's reports name source records: data/quarantine, not landing, and printed
    assert sorted(f.name for f in landing.iterdir()) == [out.name]
    summary_path = next((tmp_path / "data" / "quarantine").glob("*.summary.json"))
    summary = json.loads(summary_path.read_text())
    assert summary["balanced"] and summary["events_written"] == 2
    printed = capsys.readouterr().out
    assert str(summary_path) in printed and str(summary_path.with_suffix("").with_suffix(
        ".quarantine.tsv")) in printed
    bad = tmp_path / "bad.ndjson"
    bad.write_text("{oops\n")
    assert main(["import", "fhir", str(bad), "--mapping", "fhir.yaml", "--strict",
                 "--out", str(tmp_path / "o")]) == 1
    assert "malformed_json" in next((tmp_path / "o").glob("*.quarantine.tsv")).read_text()
    assert main(["import", "wide-csv", str(src), "--mapping", "nope.yaml"]) == 2


@needs_ref
def test_event_ids_are_keyed_and_stable(tmp_path) -> None:
    """An imported event id is an HMAC of the record's key under the platform key: stable for a
    key (a re-sent export is a duplicate), different under another, and not the unkeyed uuid5 an
    earlier version used (reversible: its namespace was public and patient numbers are guessable)."""
    import uuid

    from alliance.importers import wide_csv

    src = REF / "suddengains" / "sgdata.csv"
    a = wide_csv.import_wide_csv(src, "sgdata.yaml", key=IMPORT_KEY)
    again = wide_csv.import_wide_csv(src, "sgdata.yaml", key=IMPORT_KEY)
    other = wide_csv.import_wide_csv(src, "sgdata.yaml", key=b"another-key-0123456789abcdef0123456789")
    ids = [e["event_id"] for e in a.events]
    assert len(ids) > 100 and ids == [e["event_id"] for e in again.events]
    assert not set(ids) & {e["event_id"] for e in other.events}
    assert all(uuid.UUID(i).version == 8 for i in ids)
    episode = next(e for e in a.events if e["event_type"] == "episode.opened")
    old_scheme = uuid.uuid5(uuid.UUID("6f1c2a7e-4b7d-5c1e-9a63-0d2f8e1b7c55"),
                            f"{episode['clinic_id']}|csv-episode|{episode['patient_id']}")
    assert episode["event_id"] != str(old_scheme)


@needs_ref
@pytest.mark.parametrize(("change", "field"), [
    ({"source": "csv import with spaces"}, "source does not match"),
    ({"respondent": "martian"}, "payload.respondent of questionnaire.submitted is not one of"),
    ({"default_timing": "sometime"}, "payload.timing of questionnaire.submitted is not one of"),
    ({"default_age_group": "elderly"}, "payload.age_group of episode.opened is not one of"),
    ({"version": "2"}, "payload.instrument_version is not defined in schemas/instruments for BDI-II"),
])
def test_a_mapping_value_the_ingest_would_reject_stops_the_import(tmp_path, change, field) -> None:
    """A typo in a mapping value gave a clean-looking import whose every event the ingest then
    quarantined: the import refuses, names the field and writes nothing."""
    from alliance.importers.common import MappingError, load_mapping

    m = load_mapping("sgdata.yaml")
    if "respondent" in change or "version" in change:
        m = {**m, "scores": [{**sc, **change} for sc in m["scores"]]}
    else:
        m = {**m, **change}
    with pytest.raises(MappingError, match=re.escape(field)):
        import_wide_csv_to_landing(REF / "suddengains" / "sgdata.csv", m, tmp_path / "landing")
    assert not (tmp_path / "landing").exists() or not any((tmp_path / "landing").iterdir())


@needs_ref
def test_columns_the_mapping_does_not_read_are_listed_and_a_bad_clinic_argument_is_named(
    tmp_path, monkeypatch, capsys
) -> None:
    """A header no pattern matches (a typo) dropped its scores without a word; a bad --clinic
    value was blamed on the mapping file."""
    from alliance.importers.common import MappingError
    from orchestration.cli import main

    res = import_wide_csv(REF / "suddengains" / "sgdata.csv", "sgdata.yaml")
    assert res.summary()["unmapped_columns"] == res.unmapped_columns
    assert "bdi_fu1" in res.unmapped_columns and "rq_s0" in res.unmapped_columns
    assert not {"id", "bdi_s0", "bdi_s12"} & set(res.unmapped_columns)
    monkeypatch.setenv("ALLIANCE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ALLIANCE_PSEUDONYM_KEY", IMPORT_KEY.decode())
    assert main(["import", "wide-csv", str(REF / "suddengains" / "sgdata.csv"),
                 "--mapping", "sgdata.yaml"]) == 0
    assert "match nothing in the mapping and were not imported: bdi_fu1" in capsys.readouterr().err
    with pytest.raises(MappingError, match=r"--clinic / clinic_id argument: clinic_id 'a b'"):
        import_wide_csv_to_landing(REF / "suddengains" / "sgdata.csv", "sgdata.yaml",
                                   tmp_path / "x", clinic_id="a b")


def test_a_csv_that_cannot_be_read_whole_is_refused_naming_file_and_line(tmp_path) -> None:
    """A header naming a column twice silently let the second column's values replace the first's;
    a Latin-1 file and a folder gave tracebacks."""
    from alliance.importers.common import InputFileError

    dup = tmp_path / "dup.csv"
    dup.write_text("id,bdi_s1,bdi_s1\n1,20,30\n")
    with pytest.raises(InputFileError, match=r"dup.csv: line 1: .*'bdi_s1'"):
        import_wide_csv(dup, "sgdata.yaml")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("id,bdi_s1\n1,20\n2,caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputFileError, match=r"latin.csv: .*not UTF-8"):
        import_wide_csv(latin, "sgdata.yaml")
    with pytest.raises(InputFileError, match="is a folder"):
        import_wide_csv(tmp_path, "sgdata.yaml")
    # the bad byte's own line (the file was decoded in chunks: it said 'near line 2')
    late = tmp_path / "late.csv"
    late.write_bytes(("id,bdi_s1\n" + "".join(f"{i},1\n" for i in range(1, 900))).encode()
                     + b"900,caf\xe9\n")
    with pytest.raises(InputFileError, match=r"late.csv: line 901: not UTF-8"):
        import_wide_csv(late, "sgdata.yaml")
    # unnamed (blank) header cells of a spreadsheet export are no repeat
    blanks = tmp_path / "blanks.csv"
    blanks.write_text("id,bdi_s1,bdi_s2,,\n1,20,18,,\n")
    assert import_wide_csv(blanks, "sgdata.yaml").balanced


def test_a_resource_of_an_unexpected_shape_is_quarantined_not_the_import_lost(tmp_path) -> None:
    """Strings where FHIR has objects or lists stopped the whole import with a traceback."""
    good = _phq9_qr("q-good", "p1", [1] * 9, 9)
    bad = [{**_phq9_qr("q-b1", "p1", [1] * 9, 9), "item": [{"linkId": "/44250-9", "answer": "x"}]},
           {**_phq9_qr("q-b2", "p1", [1] * 9, 9), "item": "SECRET free text"},
           {"resourceType": "Encounter", "id": "e-b3", "status": "finished",
            "subject": {"reference": "Patient/p1"}, "period": "x"},
           {"resourceType": "Bundle", "type": "collection", "entry": [5, "x"]},
           {"resourceType": "Bundle", "type": "collection", "entry": {"a": 1}}]
    res = import_fhir(_write_ndjson(tmp_path / "in.ndjson", [good, *bad]), "fhir.yaml",
                      clinic_id="c1")
    assert res.balanced and by_type(res.events, "questionnaire.submitted")
    reasons = sorted(q["reason"] for q in res.quarantine)
    assert reasons.count("malformed_resource") == 4 and len(reasons) == 6, res.quarantine
    assert "SECRET" not in json.dumps(res.quarantine)
    # a year-only dateTime (valid FHIR) is quarantined with the reason, not as malformed
    year_only = {"resourceType": "Encounter", "id": "e-y", "status": "finished",
                 "subject": {"reference": "Patient/p1"}, "period": {"start": "2024"}}
    res_y = import_fhir(_write_ndjson(tmp_path / "year.ndjson", [good, year_only]), "fhir.yaml",
                        clinic_id="c1")
    assert [q["message"] for q in res_y.quarantine if q["record"] == "Encounter/e-y"] == [
        "has only a year: too coarse to place the record in time (a day, or at least a month, "
        "is needed)"]
    # a mapping table of the wrong shape is the mapping's error, not every record's
    from alliance.importers.common import MappingError, load_mapping

    m = load_mapping("fhir.yaml")
    bad_map = {**m, "encounter": {**m.get("encounter", {}), "class_modality": ["AMB"]}}
    with pytest.raises(MappingError, match=r"'encounter.class_modality' must be a table"):
        import_fhir(_write_ndjson(tmp_path / "in2.ndjson", [good]), bad_map, clinic_id="c1")
    # a Bundle entry's fullUrl that is not a string
    odd = {"resourceType": "Bundle", "type": "collection",
           "entry": [{"fullUrl": 5, "resource": {k: v for k, v in good.items() if k != "id"}}]}
    assert import_fhir(_write_ndjson(tmp_path / "in3.ndjson", [odd]), "fhir.yaml",
                       clinic_id="c1").balanced


def test_import_reports_go_to_quarantine_not_landing(tmp_path, monkeypatch) -> None:
    """Quarantine and summary files hold FHIR resource ids: never next to the events in landing."""
    from alliance.config import paths

    monkeypatch.setenv("ALLIANCE_DATA_DIR", str(tmp_path / "data"))
    # (an export named after a patient: the landing name, stored with every event, leaves it out)
    src = _write_ndjson(tmp_path / "patient-SECRET-77.ndjson", [
        _phq9_qr("q-secret-id", "p1", [1] * 9, 9), "{oops",
        {"resourceType": "Encounter", "id": "enc-secret-id", "status": "triaged",
         "subject": {"reference": "Patient/p1"}, "period": {"start": "2024-03-01T10:00:00Z"}}])
    landing = paths().landing
    res = import_fhir_to_landing(src, "fhir.yaml", landing)
    assert res.quarantine, "the bad lines must be quarantined for this test to mean anything"
    assert [f.name for f in landing.iterdir()] == [res.events_path.name]
    assert "secret-id" not in res.events_path.read_text()
    assert "SECRET" not in res.events_path.name and res.events_path.name.startswith("fhir-")
    assert res.quarantine_path.parent == res.summary_path.parent == paths().quarantine
    assert "enc-secret-id" in res.quarantine_path.read_text()  # why it must not sit in landing
    # a landing sub-folder is still inside the data directory
    sub = import_fhir_to_landing(src, "fhir.yaml", landing / "clinic-a")
    assert sub.quarantine_path.parent == paths().quarantine
    # an explicit output folder outside the data directory keeps them beside the events
    elsewhere = import_fhir_to_landing(src, "fhir.yaml", tmp_path / "scratch")
    assert elsewhere.quarantine_path.parent == elsewhere.summary_path.parent == tmp_path / "scratch"
    assert json.loads(elsewhere.summary_path.read_text())["events_file"] == str(
        elsewhere.events_path)


def test_wide_csv_fill_session_gaps_keeps_missing_scores_as_attended_sessions(tmp_path) -> None:
    csv_path = tmp_path / "wide.csv"
    csv_path.write_text("id,s1,s2,s3,s4,s5\n1,20,NA,18,17,NA\n2,NA,NA,15,NA,NA\n")
    mapping = {"kind": "wide_csv", "format": "wide", "clinic_id": "c1", "id_column": "id",
               "missing_values": ["NA"], "sessions": True, "first_session": 1,
               "scores": [{"instrument": "BDI-II", "column_pattern": r"^s(\d+)$"}]}

    def attended(m: dict) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for e in by_type(import_wide_csv(csv_path, m).events, "session.attended"):
            out.setdefault(e["patient_id"], []).append(e["session_id"].rsplit(":", 1)[1])
        return {k: sorted(v) for k, v in out.items()}

    assert attended(mapping) == {"1": ["t1", "t3", "t4"], "2": ["t3"]}
    filled = {**mapping, "fill_session_gaps": True}
    # the NA at s2 keeps its session; nothing after the last score is invented
    assert attended(filled) == {"1": ["t1", "t2", "t3", "t4"], "2": ["t1", "t2", "t3"]}
    res = import_wide_csv(csv_path, filled)
    assert res.balanced and res.synthesised == 3 + 2  # 3 gap sessions + 2 episode.opened
    from alliance.importers.common import MappingError

    with pytest.raises(MappingError, match="fill_session_gaps needs sessions: true"):
        import_wide_csv(csv_path, {**filled, "sessions": False})


def test_mapping_errors_name_file_and_key(tmp_path) -> None:
    from alliance.importers.common import MappingError

    p = tmp_path / "m.yaml"
    p.write_text("kind: wide_csv\nclinic_id: x\nid_column: id\nscores: [{instrument: NOPE, "
                 "column_pattern: 'a(\\d+)'}]\n")
    with pytest.raises(MappingError, match=r"m\.yaml.*scores\[0\]\.instrument"):
        import_wide_csv(p, p)
    assert isinstance(Quarantined("x"), Exception)


# --------------------------------------------------------------------------- ingest integration


@needs_ref
def test_imported_files_ingest_without_quarantine_and_phq9_scores(tmp_path) -> None:
    from alliance import ingest

    landing = tmp_path / "landing"
    results = [
        import_fhir_to_landing(REF / "fhir" / "hl7_sdc_phq9", "fhir.yaml", landing),
        import_fhir_to_landing(REF / "fhir" / "synthea_10_patients", "fhir.yaml", landing),
        import_wide_csv_to_landing(REF / "suddengains" / "sgdata.csv", "sgdata.yaml", landing),
        import_wide_csv_to_landing(REF / "clinicalsignificance" / "claus_2020.csv",
                                   "claus_2020.yaml", landing),
    ]
    con = duckdb.connect(str(tmp_path / "wh.duckdb"))
    files = ingest.ingest_files(con, [r.events_path for r in results], b"k" * 32,
                                quarantine_dir=tmp_path / "q")
    for fr in files:
        assert fr.status == "ingested", fr
        assert fr.quarantined == 0, (fr.path, fr.quarantine_reasons)
    expected = sum(len(r.events) for r in results)
    assert con.execute("select count(*) from raw.events").fetchone()[0] == expected
    # No raw identifier reaches the warehouse: every identifier the importers produced (e.g.
    # Synthea's patient UUIDs, the CSVs' row ids) is looked for in every text column of raw.*: as
    # a whole value, and the long ones (8+ characters; a short one like "12" is inside any UUID)
    # also inside a value (JSON payloads, messages).
    raw_ids = {e[k] for r in results for e in r.events
               for k in ("patient_id", "therapist_id", "episode_id", "session_id") if e.get(k)}
    long_ids = sorted(i for i in raw_ids if len(i) >= 8)
    assert len(raw_ids) > 20 and len(long_ids) >= 10
    con.register("_raw_ids", pyarrow.table({"raw": sorted(raw_ids)}))
    con.register("_long_ids", pyarrow.table({"raw": long_ids}))
    cols = con.execute("select table_name, column_name from duckdb_columns() where schema_name = 'raw' "
                       "and (data_type like '%VARCHAR%' or data_type = 'JSON')").fetchall()
    assert len(cols) > 10
    for t, c in cols:
        v = f'x."{c}"::varchar'
        hits = con.execute(
            f'select count(*) from raw."{t}" x where {v} in (select raw from _raw_ids) '
            f"or exists (select 1 from _long_ids l where contains({v}, l.raw))").fetchone()[0]
        assert hits == 0, f"raw identifier in raw.{t}.{c}"
    assert con.execute("select count(*) from raw.events where patient_id not like 'pt_%'"
                       ).fetchone()[0] == 0

    from alliance import instruments as ins
    from alliance.sqlrunner import discover_models, run_models

    assert "core.questionnaire_scores" in discover_models()
    ins.write_seed_tables(con, ins.load_instruments())
    from alliance.config import SQL_DIR
    if (SQL_DIR / "parameters.yml").exists():
        ins.write_parameters_table(con, SQL_DIR / "parameters.yml")
    run_models(con, "core.questionnaire_scores", upstream=True)
    row = con.execute("""select total, total_reported, total_mismatch from core.questionnaire_scores
                         where instrument = 'PHQ-9'""").fetchall()
    assert row == [(10.0, 13.0, True)]


def _hl7_phq9_export(folder: Path, status: str) -> Path:
    """The HL7 PHQ-9 example as a bulk export would hold it with the response's status."""
    folder.mkdir(parents=True)
    for f in (REF / "fhir" / "hl7_sdc_phq9").iterdir():
        doc = json.loads(f.read_text())
        if doc.get("resourceType") == "QuestionnaireResponse" and status == "amended":
            doc = {**doc, "status": "amended", "meta": {**doc.get("meta", {}), "versionId": "2"}}
        (folder / f.name).write_text(json.dumps(doc))
    return folder


@needs_ref
def test_amended_first_fhir_response_is_scored_and_a_late_original_joins_it(tmp_path) -> None:
    # A bulk export holds only the current version of a QuestionnaireResponse: one corrected
    # before the clinic's first export arrives as an amendment whose submission never comes.
    from alliance import ingest
    from alliance import instruments as ins
    from alliance.config import SQL_DIR
    from alliance.sqlrunner import run_models

    amended = import_fhir_to_landing(_hl7_phq9_export(tmp_path / "x1", "amended"), "fhir.yaml",
                                     tmp_path / "landing1")
    original = import_fhir_to_landing(_hl7_phq9_export(tmp_path / "x0", "completed"), "fhir.yaml",
                                      tmp_path / "landing0")
    assert amended.balanced and not amended.quarantine
    [amd] = by_type(amended.events, "questionnaire.amended")
    [sub] = by_type(original.events, "questionnaire.submitted")
    assert amd["payload"]["amends_event_id"] == sub["event_id"]  # deterministic ids
    assert len(by_type(amended.events, "episode.opened")) == 1  # synthesised for it too

    con = duckdb.connect(str(tmp_path / "wh.duckdb"))
    ins.write_seed_tables(con, ins.load_instruments())
    ins.write_parameters_table(con, SQL_DIR / "parameters.yml")
    scored = """select s.response_id, s.event_id, s.total, s.total_reported, s.version_count,
                       r.is_orphan, e.opened_at is not null
                from core.questionnaire_scores as s
                join staging.stg_questionnaire_responses as r using (response_id)
                left join core.episodes as e on e.episode_id = s.episode_id"""
    for path, expected in [
        # scored on its own, under the id its submission would have had
        (amended.events_path, [(sub["event_id"], amd["event_id"], 10.0, 13.0, 1, True, True)]),
        # the original arrives later: same response, the correction still counts
        (original.events_path, [(sub["event_id"], amd["event_id"], 10.0, 13.0, 2, False, True)]),
    ]:
        [fr] = ingest.ingest_files(con, [path], b"k" * 32, quarantine_dir=tmp_path / "q")
        assert (fr.status, fr.quarantined) == ("ingested", 0), fr.quarantine_reasons
        run_models(con, ["core.questionnaire_scores", "core.episodes"], upstream=True, tests=True)
        assert con.execute(scored).fetchall() == expected


# --------------------------------------------------------------------------- Parquet export


def test_parquet_export_asset_partitions_by_clinic_and_month(tmp_path) -> None:
    from assets.exports import parquet_export
    from orchestration.resources import AllianceSettings

    data = tmp_path / "data"
    serving = data / "serving" / "alliance.duckdb"
    serving.parent.mkdir(parents=True)
    con = duckdb.connect(str(serving))
    con.execute("create schema marts; create schema core; create schema raw")
    con.execute("""create table marts.clinic_monthly as select * from (values
        ('c1', date '2024-01-01', 5), ('c1', date '2024-02-01', 7), ('c2', date '2024-01-01', 3))
        t(clinic_id, month, sessions)""")
    con.execute("create table core.sessions as select 'c1' as clinic_id, 's' as session_id")
    con.execute("create table marts.instrument_summary as select 'PHQ-9' as instrument, 2 as n")
    con.execute("create table raw.events as select 1 as x")
    con.close()
    result = dg.materialize([parquet_export],
                            resources={"settings": AllianceSettings(data_dir=str(data))})
    assert result.success
    out = data / "exports" / "parquet"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet"))
    assert any(f.startswith("marts/clinic_monthly/clinic_id=c1/month=2024-02-01/") for f in files)
    assert any(f.startswith("marts/clinic_monthly/clinic_id=c2/month=2024-01-01/") for f in files)
    assert "marts/instrument_summary/data.parquet" in files
    assert not any(f.startswith("raw/") for f in files)
    back = duckdb.sql(f"select clinic_id, sum(sessions)::int from read_parquet('{out}/marts/"
                      "clinic_monthly/**/*.parquet', hive_partitioning = true) group by 1 order by 1"
                      ).fetchall()
    assert back == [("c1", 12), ("c2", 3)]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert {t["table"] for t in manifest["tables"]} == {
        "marts.clinic_monthly", "marts.instrument_summary", "core.sessions"}
    [mat] = [e.materialization for e in result.get_asset_materialization_events()]
    assert mat.asset_key == dg.AssetKey(["exports", "parquet"])
    assert mat.metadata["rows"].value == 5
    # the export names the snapshot it was made from; status tells whether that is the current one
    from alliance.snapshot import data_version
    from orchestration.cli_ops import _export_state

    with duckdb.connect(str(serving), read_only=True) as snap:
        version = data_version(snap)
    assert manifest["snapshot"]["data_version"] == version
    assert mat.metadata["snapshot_data_version"].value == version
    assert _export_state(out, version)["current"] is True
    with duckdb.connect(str(serving)) as con:  # a newer snapshot (a landed file was published)
        con.execute("insert into raw.events values (2)")
        newer = data_version(con)
    assert newer != version and _export_state(out, newer)["current"] is False


def test_a_redcap_form_without_date_field_names_the_mapping_and_the_form(tmp_path) -> None:
    """The message named neither the mapping file nor the form ('mapping: required key ...')."""
    from alliance.importers.common import MappingError, load_mapping

    export, dictionary = _redcap_fixture(tmp_path)
    m = load_mapping("redcap.yaml", "redcap")
    m = {**m, "instruments": [{k: v for k, v in f.items() if k != "date_field"} if i == 1 else f
                              for i, f in enumerate(m["instruments"])]}
    with pytest.raises(MappingError, match=r"redcap\.yaml: instruments\[1\]: required key 'date_field'"):
        import_redcap(export, dictionary, m, clinic_id="rc1")
