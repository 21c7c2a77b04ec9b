"""Instrument definitions, seed tables and the generic scoring SQL, checked on hand-computed cases."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
import yaml
from conftest import REF_REMEDY, require_present

from alliance import instruments as inst
from alliance.sqlrunner import run_models

MODELS = [
    # stg_events: the one as-of filter every staging model reads through
    "stg_events", "stg_questionnaire_versions", "stg_questionnaire_retractions", "stg_questionnaire_responses",
    "questionnaire_item_answers", "questionnaire_scores", "questionnaire_subscale_scores",
]
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
if not REFERENCE.exists():
    REFERENCE = Path("/work/shared/reference")

RAW_EVENTS_DDL = """
create schema if not exists raw;
create table if not exists raw.events (
    event_id varchar primary key, content_hash varchar, event_type varchar, schema_version int,
    occurred_at timestamptz, recorded_at timestamptz, source varchar, clinic_id varchar,
    patient_id varchar, therapist_id varchar, episode_id varchar, session_id varchar,
    payload json, file_id bigint, source_file varchar, line_number bigint, dropped_fields int
)
"""

# A clinic's own instrument, dropped in as a file: mean scoring, a reversed item, prorating.
CUSTOM_YAML = """
code: CLINIC-WB
version: "2"
name: Clinic wellbeing check
construct: outcome
kind: item_level
source: clinic
items: {count: 3, min: 0, max: 4, step: 1, source: clinic}
reverse_keyed: {items: [2], source: clinic}
scoring: {rule: mean, source: clinic}
prorating: {max_missing: 1, method: mean_substitution, source: clinic}
direction: {higher_is_better: true, source: clinic}
total: {min: 0, max: 4, source: clinic}
bands:
  source: clinic
  levels:
    - {label: low, min: 0, max: 1.99}
    - {label: high, min: 2, max: 4}
sources:
  clinic: {author: "Example Clinic", year: 2025}
"""


class Events:
    """Builds raw.events rows; times are minutes after a fixed start so order is explicit."""

    def __init__(self) -> None:
        self.rows: list[list[object]] = []

    def add(self, event_id: str, event_type: str, payload: dict, *, minute: int = 0,
            recorded_minute: int | None = None, episode: str = "ep_adult", session: str | None = None,
            therapist: str | None = None) -> None:
        t = f"2026-01-05 09:{minute:02d}:00+00"
        rec = f"2026-01-05 10:{(recorded_minute if recorded_minute is not None else minute):02d}:00+00"
        self.rows.append([event_id, "h", event_type, 1, t, rec, "test", "c1", "pt_1", therapist,
                          episode, session, json.dumps(payload), 1, "f.ndjson", len(self.rows) + 1, 0])

    def q(self, event_id: str, instrument: str, answers: list | None = None, *, total: float | None = None,
          event_type: str = "questionnaire.submitted", amends: str | None = None, **kw) -> None:
        payload: dict[str, object] = {
            "instrument": instrument, "instrument_version": kw.pop("version", "1"),
            "respondent": "patient", "administered_at": "2026-01-05T09:00:00+00:00",
            "timing": "pre_session",
        }
        if answers is not None:
            payload["answers"] = {str(i + 1): a for i, a in enumerate(answers)}
        if total is not None:
            payload["total"] = total
        if amends:
            payload["amends_event_id"] = amends
        self.add(event_id, event_type, payload, **kw)

    def write(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute(RAW_EVENTS_DDL)
        cols = ["event_id", "content_hash", "event_type", "schema_version", "occurred_at",
                "recorded_at", "source", "clinic_id", "patient_id", "therapist_id", "episode_id",
                "session_id", "payload", "file_id", "source_file", "line_number", "dropped_fields"]
        batch = pa.table({c: [r[i] for r in self.rows] for i, c in enumerate(cols)})  # noqa: F841
        con.execute("insert into raw.events by name select * from batch")


def build(con: duckdb.DuckDBPyConnection, defs: dict) -> None:
    inst.write_seed_tables(con, defs)
    # tests=True: every sidecar column test of these models must pass on the fixture data
    run_models(con, MODELS, tests=True)


@pytest.fixture(scope="module")
def custom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("clinic_instruments")
    (d / "clinic-wb.yaml").write_text(CUSTOM_YAML)
    return d


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory, custom_dir: Path):
    e = Events()
    e.add("open_child", "episode.opened", {"age_group": "child"}, episode="ep_child")
    e.add("open_teen", "episode.opened", {"age_group": "adolescent"}, episode="ep_teen")
    e.add("open_adult", "episode.opened", {"age_group": "adult"}, episode="ep_adult")
    e.add("assign", "therapist.assigned", {"role": "primary"}, therapist="th_episode")
    e.add("attend", "session.attended", {}, session="se_1", therapist="th_session")
    # PHQ-9: all 2s = 18 (moderately severe), item 9 = 2 is critical; reported total agrees
    e.q("phq_18", "PHQ-9", [2] * 9, total=18)
    e.q("phq_10", "PHQ-9", [3, 3, 3, 1, 0, 0, 0, 0, 0])  # exactly on the caseness cutoff 10
    e.q("phq_9", "PHQ-9", [3, 3, 3, 0, 0, 0, 0, 0, 0])  # 9: mild, not a case
    e.q("phq_pro2", "PHQ-9", [2, 2, 2, 2, 2, 2, 2, None, None], total=17)  # 2 missing: 2*9 = 18
    e.q("phq_pro3", "PHQ-9", [2, 2, 2, 2, 2, 2, None, None, None])  # 3 missing: refused
    # GAD-7: 8 is a case (NHS TT) and mild; 10 starts moderate; one missing item is refused
    e.q("gad_8", "GAD-7", [2, 2, 2, 2, 0, 0, 0])
    e.q("gad_7", "GAD-7", [1] * 7)
    e.q("gad_10", "GAD-7", [2, 2, 2, 2, 2, 0, 0])
    e.q("gad_miss", "GAD-7", [3, 3, 3, 3, 3, 3, None])
    # CORE-10: items 2 and 3 reversed (4 - answer)
    e.q("core_7", "CORE-10", [1, 4, 4, 1, 1, 0, 1, 1, 1, 1])  # 1+0+0+1+1+0+1+1+1+1 = 7
    # one missing: 9 answered sum 2+4+4+2+2+1+2+2+2 = 21, mean 7/3, total 70/3; item 6 = 1
    e.q("core_pro", "CORE-10", [2, 0, 0, 2, 2, 1, 2, 2, 2, None], total=20)
    e.q("core_11", "CORE-10", [2, 2, 2, 2, 2, 0, 1, 0, 0, 0])  # 2+2+2+2+2+0+1 = 11 on cutoff
    # WAI-SR: task 1,2,10,12 = 5+4+1+4; bond 3,5,7,9 = 3+1+4+2; goal 4,6,8,11 = 2+5+3+5
    e.q("wai", "WAI-SR", [5, 4, 3, 2, 1, 5, 4, 3, 2, 1, 5, 4], session="se_1")
    e.q("wai_miss", "WAI-SR", [5, 4, 3, 2, None, 5, 4, 3, 2, 1, 5, 4])
    # SRS: 36 is not a concern (below 36 is); decimals must meet the cutoff exactly
    e.q("srs_36", "SRS", [9, 9, 9, 9])
    e.q("srs_359", "SRS", [9, 9, 9, 8.9])
    e.q("srs_dec", "SRS", [8.9, 9.1, 9.0, 9.0])
    # ORS: cutoffs by the episode's age group
    e.q("ors_child", "ORS", [8, 8, 8, 7.9], episode="ep_child")  # 31.9 < 32
    e.q("ors_teen", "ORS", [7, 7, 7, 7], episode="ep_teen")  # 28: not below 28
    e.q("ors_adult", "ORS", [6.2, 6.2, 6.2, 6.3])  # 24.9 < 25
    e.q("ors_adult25", "ORS", [6.25, 6.25, 6.25, 6.25])  # 25 is not clinical
    # BDI-II total only
    e.q("bdi_13", "BDI-II", total=13)
    e.q("bdi_14", "BDI-II", total=14)
    e.q("bdi_29", "BDI-II", total=29)
    e.q("bdi_bad", "BDI-II", total=70)
    # corrections: (a) amended; (b) amendment chain with the last amendment retracted;
    # (c) amended then the submission retracted; (d) an orphan amendment (its submission never
    # arrived: it stands as its own response under the missing submission's id); (e) an orphan
    # chain of two amendments; (f) an orphan whose missing submission is retracted
    e.q("a_sub", "PHQ-9", [0] * 9, minute=1)
    e.q("a_amd", "PHQ-9", [1] * 9, minute=2, event_type="questionnaire.amended", amends="a_sub")
    e.q("b_sub", "GAD-7", [0] * 7, minute=1)
    e.q("b_am1", "GAD-7", [1] * 7, minute=2, event_type="questionnaire.amended", amends="b_sub")
    e.q("b_am2", "GAD-7", [2] * 7, minute=3, event_type="questionnaire.amended", amends="b_am1")
    e.add("b_ret", "questionnaire.retracted", {"retracts_event_id": "b_am2"}, minute=4)
    e.q("c_sub", "SRS", [5, 5, 5, 5], minute=1)
    e.q("c_amd", "SRS", [6, 6, 6, 6], minute=2, event_type="questionnaire.amended", amends="c_sub")
    e.add("c_ret", "questionnaire.retracted", {"retracts_event_id": "c_sub"}, minute=5)
    e.q("orphan", "PHQ-9", [1] * 9, event_type="questionnaire.amended", amends="nowhere")
    e.q("e_am1", "GAD-7", [1] * 7, minute=2, event_type="questionnaire.amended", amends="e_gone")
    e.q("e_am2", "GAD-7", [3] * 7, minute=3, event_type="questionnaire.amended", amends="e_am1")
    e.q("f_amd", "SRS", [6, 6, 6, 6], minute=2, event_type="questionnaire.amended", amends="f_gone")
    e.add("f_ret", "questionnaire.retracted", {"retracts_event_id": "f_gone"}, minute=5)
    # (g) a malformed loop of amendments: no root, no response
    e.q("g_lp1", "PHQ-9", [1] * 9, event_type="questionnaire.amended", amends="g_lp2")
    e.q("g_lp2", "PHQ-9", [2] * 9, event_type="questionnaire.amended", amends="g_lp1")
    # the clinic's own instrument: mean of 4, (4 - 1), 2 = 3; one missing: mean of 4 and 3
    e.q("wb", "CLINIC-WB", [4, 1, 2], version="2")
    e.q("wb_pro", "CLINIC-WB", [4, 1, None], version="2")

    con = duckdb.connect(str(tmp_path_factory.mktemp("wh") / "w.duckdb"))
    e.write(con)
    build(con, inst.load_instruments([inst.INSTRUMENTS_DIR, custom_dir]))
    yield con
    con.close()


def score(con: duckdb.DuckDBPyConnection, response_id: str) -> dict:
    cur = con.execute("select * from core.questionnaire_scores where response_id = ?", [response_id])
    row = cur.fetchone()
    assert row is not None, f"{response_id} not scored"
    return dict(zip([d[0] for d in cur.description], row, strict=True))


# ---------------------------------------------------------------------------------- definitions


def test_shipped_definitions_load_with_issue_values() -> None:
    defs = inst.load_instruments([inst.INSTRUMENTS_DIR])
    assert set(defs) == {(c, "1") for c in
                         ("WAI-SR", "SRS", "ORS", "PHQ-9", "GAD-7", "CORE-10", "BDI-II")}
    phq = defs["PHQ-9", "1"]
    assert [i.loinc for i in phq.items] == ["44250-9", "44255-8", "44259-0", "44254-1", "44251-7",
                                           "44258-2", "44252-5", "44253-3", "44260-8"]
    assert (phq.loinc_panel, phq.loinc_total, phq.reliable_change) == ("44249-1", "44261-6", 6)
    assert [(b.min_score, b.max_score) for b in phq.bands] == [(0, 4), (5, 9), (10, 14), (15, 19), (20, 27)]
    assert phq.items[8].critical_operator == ">" and phq.items[8].critical_threshold == 0
    assert defs["GAD-7", "1"].caseness_threshold == 8 and defs["GAD-7", "1"].reliable_change == 4
    assert dict(defs["ORS", "1"].clinical_cutoffs) == {"adult": 25, "adolescent": 28, "child": 32}
    assert defs["SRS", "1"].items[0].step == 0.1
    assert (defs["SRS", "1"].alliance_concern_cutoff, defs["SRS", "1"].alliance_concern_operator) == (36, "<")
    core = defs["CORE-10", "1"]
    assert [i.number for i in core.items if i.reverse_keyed] == [2, 3]
    assert (core.clinical_cutoffs["any"], core.reliable_change) == (11, 6)
    wai = defs["WAI-SR", "1"]
    assert {s.name: s.items for s in wai.subscales} == {
        "task": (1, 2, 10, 12), "bond": (3, 5, 7, 9), "goal": (4, 6, 8, 11)}
    bdi = defs["BDI-II", "1"]
    assert bdi.kind == "total_only" and (bdi.total_min, bdi.total_max) == (0, 63)
    # every instrument cites author and year for every value it sets
    for d in defs.values():
        assert d.citations and all(d.sources[k]["year"] for k in d.citations.values())


def test_parameters_override_where_sources_disagree() -> None:
    defs = inst.load_instruments([inst.INSTRUMENTS_DIR], parameters={
        "core10_reverse_keyed_items": [], "phq9_prorate_max_missing": 0,
        "srs_alliance_concern_operator": "<="})
    assert not any(i.reverse_keyed for i in defs["CORE-10", "1"].items)
    assert defs["PHQ-9", "1"].prorate_max_missing == 0
    assert defs["SRS", "1"].alliance_concern_operator == "<="
    with pytest.raises(inst.InstrumentError, match="srs_alliance_concern_operator"):
        inst.load_instruments([inst.INSTRUMENTS_DIR], parameters={"srs_alliance_concern_operator": "=="})
    with pytest.raises(inst.InstrumentError, match="no_such_parameter"):
        inst.load_instruments([inst.INSTRUMENTS_DIR], parameters={"no_such_parameter": 1})


def test_parameters_from_environment_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "clinic-parameters.yaml"
    f.write_text("core10_reverse_keyed_items: []\n")
    monkeypatch.setenv(inst.ENV_PARAMETERS, str(f))
    monkeypatch.delenv(inst.ENV_DIRS, raising=False)
    defs = inst.load_instruments()
    assert not any(i.reverse_keyed for i in defs["CORE-10", "1"].items)
    con = duckdb.connect()
    inst.write_seed_tables(con, defs)
    assert con.execute("select value_used from seeds.instrument_parameters "
                       "where parameter = 'core10_reverse_keyed_items'").fetchone() == ("[]",)


def test_items_table_for_ingest_checks() -> None:
    t = inst.items_table(inst.load_instruments([inst.INSTRUMENTS_DIR])).to_pylist()
    phq = [r for r in t if r["instrument"] == "PHQ-9"]
    assert [r["item"] for r in phq] == [str(i) for i in range(1, 10)]
    assert {(r["min_value"], r["max_value"], r["step"]) for r in phq} == {(0, 3, 1)}
    assert {r["step"] for r in t if r["instrument"] == "ORS"} == {0.1}
    # a total-only instrument is known to the ingest through one row with item NULL
    assert [(r["item"], r["max_value"]) for r in t if r["instrument"] == "BDI-II"] == [(None, 63)]


def test_user_instrument_added_by_a_file(custom_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(inst.ENV_DIRS, str(custom_dir))
    defs = inst.load_instruments()
    assert ("CLINIC-WB", "2") in defs and ("PHQ-9", "1") in defs
    # the same code and version twice is refused, naming both files
    dup = custom_dir.parent / "dup"
    dup.mkdir(exist_ok=True)
    shutil.copy(custom_dir / "clinic-wb.yaml", dup / "again.yaml")
    with pytest.raises(inst.InstrumentError, match=r"again\.yaml.*already defined in .*clinic-wb\.yaml"):
        inst.load_instruments([custom_dir, dup])


BAD_EDITS = [
    # (description, edit of the parsed YAML, expected message fragment)
    ("missing field", lambda d: d.pop("direction"), "missing required field 'direction'"),
    ("unknown field", lambda d: d.update(wording="x"), "field 'wording': unknown field"),
    ("reverse item out of range", lambda d: d["reverse_keyed"].update(items=[4]),
     r"line \d+, field 'reverse_keyed.items\[0\]': must be an item number 1..3"),
    ("unlisted source", lambda d: d["scoring"].update(source="nobody2020"),
     r"field 'scoring.source': 'nobody2020' is not listed"),
    ("total inconsistent", lambda d: d["total"].update(max=12), r"field 'total': range 0-12"),
    ("bad operator", lambda d: d.update(caseness={"threshold": 2, "operator": "=", "source": "clinic"}),
     r"field 'caseness.operator': must be one of"),
    ("bands gap", lambda d: d["bands"]["levels"].pop(), "must cover the total range"),
    ("critical rule never true", lambda d: d.update(critical_items=[
        {"item": 1, "operator": ">", "threshold": 9, "source": "clinic"}]),
     r"field 'critical_items\[0\]\.threshold': '> 9' is never true for answers 0..4"),
    ("critical rule always true", lambda d: d.update(critical_items=[
        {"item": 1, "operator": ">=", "threshold": 0, "source": "clinic"}]),
     r"'>= 0' is always true"),
]


@pytest.mark.parametrize("label,edit,message", BAD_EDITS, ids=[b[0] for b in BAD_EDITS])
def test_malformed_file_names_file_and_field(tmp_path: Path, label, edit, message) -> None:
    d = yaml.safe_load(CUSTOM_YAML)
    edit(d)
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(inst.InstrumentError, match=message) as err:
        inst.load_instruments([tmp_path])
    assert "broken.yaml" in str(err.value)


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "typo.yaml").write_text("code: X\nversion: '1'\nitems: [1, 2\n")
    with pytest.raises(inst.InstrumentError, match=r"typo\.yaml, line \d+: not valid YAML"):
        inst.load_instruments([tmp_path])


def test_a_key_given_twice_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys silently: a second cutoff replaced the first."""
    text = (inst.INSTRUMENTS_DIR / "phq-9.yaml").read_text()
    assert "\ncode: PHQ-9\n" in text
    (tmp_path / "twice.yaml").write_text(text.replace("\ncode: PHQ-9\n", "\ncode: PHQ-9\ncode: X\n"))
    with pytest.raises(inst.InstrumentError, match=r"twice\.yaml, line \d+: not valid YAML .*"
                       r"'code' is given twice"):
        inst.load_instrument_file(tmp_path / "twice.yaml")


# --------------------------------------------------------------------------------- seed tables


def test_seed_tables_are_documented(warehouse: duckdb.DuckDBPyConnection) -> None:
    missing = warehouse.execute("""
        select table_name, column_name from duckdb_columns()
        where schema_name = 'seeds' and table_name like 'instrument%' and comment is null""").fetchall()
    assert missing == []
    tables = dict(warehouse.execute(
        "select table_name, comment from duckdb_tables() where schema_name = 'seeds'").fetchall())
    assert {"instruments", "instrument_items", "instrument_subscales", "instrument_bands",
            "instrument_cutoffs", "instrument_parameters"} <= set(tables)
    assert all(tables.values())
    cites = warehouse.execute(
        "select citations from seeds.instruments where instrument = 'ORS'").fetchone()[0]
    assert "Miller" in cites and "2003" in cites and "Duncan" in cites and "2006" in cites


# ------------------------------------------------------------------------------------- scoring


def test_phq9_bands_caseness_critical_and_prorating(warehouse) -> None:
    s = score(warehouse, "phq_18")
    assert (s["total"], s["severity_band"], s["caseness"], s["critical_item_flag"],
            s["critical_items"], s["total_mismatch"], s["mean_item"]) == (
        18, "moderately_severe", True, True, "9", False, 2)
    assert (score(warehouse, "phq_10")["severity_band"], score(warehouse, "phq_10")["caseness"]) == ("moderate", True)
    s9 = score(warehouse, "phq_9")
    assert (s9["total"], s9["severity_band"], s9["caseness"], s9["critical_item_flag"]) == (9, "mild", False, False)
    p = score(warehouse, "phq_pro2")
    assert (p["total"], p["prorated"], p["prorated_items"], p["items_answered"], p["is_scorable"]) == (18, True, 2, 7, True)
    assert p["total_mismatch"] is True  # the source said 17
    # item 9 (the risk item) unanswered: prorated, but the risk is unknown, not "no risk"
    assert (p["critical_item_flag"], p["critical_item_missing"]) == (None, True)
    assert (s9["critical_item_missing"], score(warehouse, "phq_18")["critical_item_missing"]) == (False, False)
    r = score(warehouse, "phq_pro3")
    assert (r["total"], r["is_scorable"], r["prorated"], r["severity_band"], r["caseness"]) == (None, False, False, None, None)


def test_gad7_caseness_edges_and_no_prorating(warehouse) -> None:
    assert (score(warehouse, "gad_8")["caseness"], score(warehouse, "gad_8")["severity_band"]) == (True, "mild")
    assert (score(warehouse, "gad_7")["caseness"], score(warehouse, "gad_7")["total"]) == (False, 7)
    assert score(warehouse, "gad_10")["severity_band"] == "moderate"
    m = score(warehouse, "gad_miss")
    assert (m["is_scorable"], m["total"], m["items_answered"], m["items_expected"]) == (False, None, 6, 7)


def test_core10_reverse_keys_prorating_cutoff_and_risk_item(warehouse) -> None:
    s = score(warehouse, "core_7")
    assert (s["total"], s["reverse_keyed_items"], s["severity_band"], s["caseness"]) == (7, "2,3", "low", False)
    p = score(warehouse, "core_pro")
    assert p["total"] == pytest.approx(70 / 3, abs=1e-6)
    assert (p["prorated_items"], p["severity_band"], p["caseness"], p["critical_items"]) == (1, "moderately_severe", True, "6")
    assert p["total_mismatch"] is True  # the source said 20
    e = score(warehouse, "core_11")
    assert (e["total"], e["caseness"], e["clinical_range"], e["severity_band"]) == (11, True, True, "mild")


def test_wai_sr_total_mean_and_subscales(warehouse) -> None:
    s = score(warehouse, "wai")
    assert (s["total"], s["mean_item"], s["construct"], s["severity_band"], s["alliance_concern"]) == (
        39, 3.25, "alliance", None, None)
    subs = dict(warehouse.execute("select subscale, score from core.questionnaire_subscale_scores "
                                  "where response_id = 'wai'").fetchall())
    assert subs == {"task": 14, "bond": 10, "goal": 15}
    miss = dict(warehouse.execute("select subscale, score from core.questionnaire_subscale_scores "
                                  "where response_id = 'wai_miss'").fetchall())
    assert miss == {"task": 14, "bond": None, "goal": 15}
    assert score(warehouse, "wai_miss")["is_scorable"] is False


def test_srs_alliance_concern_at_the_cutoff(warehouse) -> None:
    assert (score(warehouse, "srs_36")["total"], score(warehouse, "srs_36")["alliance_concern"]) == (36, False)
    assert (score(warehouse, "srs_359")["total"], score(warehouse, "srs_359")["alliance_concern"]) == (35.9, True)
    assert (score(warehouse, "srs_dec")["total"], score(warehouse, "srs_dec")["alliance_concern"]) == (36, False)


def test_ors_age_specific_cutoffs(warehouse) -> None:
    got = {r: (score(warehouse, r)["clinical_cutoff"], score(warehouse, r)["caseness"],
               score(warehouse, r)["age_group"])
           for r in ("ors_child", "ors_teen", "ors_adult", "ors_adult25")}
    assert got == {"ors_child": (32, True, "child"), "ors_teen": (28, False, "adolescent"),
                   "ors_adult": (25, True, "adult"), "ors_adult25": (25, False, "adult")}
    assert score(warehouse, "ors_adult")["reliable_change"] == 5


def test_bdi2_total_only(warehouse) -> None:
    got = {r: (score(warehouse, r)["severity_band"], score(warehouse, r)["caseness"])
           for r in ("bdi_13", "bdi_14", "bdi_29")}
    assert got == {"bdi_13": ("minimal", False), "bdi_14": ("mild", True), "bdi_29": ("severe", True)}
    b = score(warehouse, "bdi_13")
    assert (b["kind"], b["items_expected"], b["mean_item"], b["total_mismatch"]) == ("total_only", None, None, None)
    assert score(warehouse, "bdi_bad")["is_scorable"] is False  # 70 is outside 0-63


def test_user_defined_instrument_is_scored_by_the_same_sql(warehouse) -> None:
    assert score(warehouse, "wb")["total"] == 3  # mean of 4, 4-1, 2
    p = score(warehouse, "wb_pro")
    assert (p["total"], p["prorated_items"], p["severity_band"]) == (3.5, 1, "high")


def test_therapist_filled_from_session_or_episode(warehouse) -> None:
    assert score(warehouse, "wai")["therapist_id"] == "th_session"
    assert score(warehouse, "phq_18")["therapist_id"] == "th_episode"


# ---------------------------------------------------------------------------------- corrections


def test_amendments_and_retractions(warehouse) -> None:
    a = score(warehouse, "a_sub")
    assert (a["event_id"], a["total"], a["version_count"], a["is_amended"]) == ("a_amd", 9, 2, True)
    b = score(warehouse, "b_sub")  # last amendment retracted: falls back to the first amendment
    assert (b["event_id"], b["total"], b["version_count"], b["retracted_version_count"]) == ("b_am1", 7, 3, 1)
    ids = {r[0] for r in warehouse.execute("select response_id from core.questionnaire_scores").fetchall()}
    assert "c_sub" not in ids
    # the full history stays queryable
    hist = warehouse.execute("""select event_id, response_id, version_number, amendment_depth,
        is_orphan
        from staging.stg_questionnaire_versions
        where event_id in ('b_sub', 'b_am1', 'b_am2', 'c_sub', 'c_amd', 'orphan', 'e_am1', 'e_am2')
        order by event_id""").fetchall()
    assert hist == [("b_am1", "b_sub", 2, 1, False), ("b_am2", "b_sub", 3, 2, False),
                    ("b_sub", "b_sub", 1, 0, False), ("c_amd", "c_sub", 2, 1, False),
                    ("c_sub", "c_sub", 1, 0, False), ("e_am1", "e_gone", 1, 1, True),
                    ("e_am2", "e_gone", 2, 2, True), ("orphan", "nowhere", 1, 1, True)]


def test_orphan_amendments_are_scored_under_the_missing_submissions_id(warehouse) -> None:
    # An amendment whose submission never arrived (a FHIR export of an already corrected
    # response) is a response of its own: response_id = the id its submission would have.
    o = score(warehouse, "nowhere")
    assert (o["event_id"], o["total"], o["version_count"], o["is_amended"]) == ("orphan", 9, 1, True)
    e = score(warehouse, "e_gone")  # an orphan chain: its latest amendment counts
    assert (e["event_id"], e["total"], e["version_count"]) == ("e_am2", 21, 2)
    flags = dict(warehouse.execute("select response_id, is_orphan from "
                                   "staging.stg_questionnaire_responses").fetchall())
    assert (flags["nowhere"], flags["e_gone"], flags["a_sub"]) == (True, True, False)
    # a retraction naming the missing submission's id withdraws the whole orphan chain
    ids = {r[0] for r in warehouse.execute("select response_id from core.questionnaire_scores").fetchall()}
    assert "f_gone" not in ids
    assert warehouse.execute("select response_id from staging.stg_questionnaire_versions "
                             "where event_id = 'f_amd'").fetchall() == [("f_gone",)]
    # is_orphan stays a warn-level (informative) test
    from alliance.sqlrunner import discover_models, run_tests

    model = discover_models()["staging.stg_questionnaire_versions"]
    [orphan_test] = [r for r in run_tests(warehouse, model) if r.test.column == "is_orphan"]
    assert (orphan_test.test.severity, orphan_test.failing) == ("warn", 6)
    # amendments in a loop reach no root: kept in the history, never a response
    loop = warehouse.execute("select event_id, response_id, is_orphan from "
                             "staging.stg_questionnaire_versions where event_id in ('g_lp1', 'g_lp2') "
                             "order by event_id").fetchall()
    assert loop == [("g_lp1", None, True), ("g_lp2", None, True)]
    assert warehouse.execute("select count(*) from staging.stg_questionnaire_responses "
                             "where event_id in ('g_lp1', 'g_lp2')").fetchone()[0] == 0


def test_as_of_reproduces_the_past(warehouse) -> None:
    q = "select event_id from staging.stg_questionnaire_responses where response_id = ?"
    staged = ["staging.stg_questionnaire_versions", "staging.stg_questionnaire_retractions",
              "staging.stg_questionnaire_responses"]
    try:
        # before the retraction of c_sub (recorded 10:05) the amended version counted
        warehouse.execute("set variable as_of = '2026-01-05 10:03:00+00'")
        run_models(warehouse, staged)  # tables are rebuilt as of the cutoff, as asof_job does
        assert warehouse.execute(q, ["c_sub"]).fetchall() == [("c_amd",)]
        assert warehouse.execute(q, ["b_sub"]).fetchall() == [("b_am2",)]
        warehouse.execute("set variable as_of = '2026-01-05 10:01:30+00'")
        run_models(warehouse, staged)
        assert warehouse.execute(q, ["b_sub"]).fetchall() == [("b_sub",)]
    finally:
        warehouse.execute("reset variable as_of")
        run_models(warehouse, staged)
    assert warehouse.execute(q, ["c_sub"]).fetchall() == []


# ------------------------------------------------------------------------ dagster and reference


def test_seed_assets_materialise(tmp_path: Path) -> None:
    import dagster as dg
    from dagster_duckdb import DuckDBResource

    from assets.seeds import instrument_seeds, parameters_seed

    db = tmp_path / "w.duckdb"
    result = dg.materialize([instrument_seeds, parameters_seed],
                            resources={"duckdb": DuckDBResource(database=str(db))})
    assert result.success
    counts = {e.asset_key.to_user_string(): e.materialization.metadata["dagster/row_count"].value
              for e in result.get_asset_materialization_events()}
    with duckdb.connect(str(db)) as con:
        n_items = con.execute("select count(*) from seeds.instrument_items").fetchone()[0]
        n_params = con.execute("select count(*) from seeds.parameters").fetchone()[0]
    assert counts["seeds/instrument_items"] == n_items == 9 + 7 + 10 + 12 + 4 + 4
    assert counts["seeds/parameters"] == n_params


def test_bdi_totals_from_published_data_are_banded(tmp_path: Path) -> None:
    src = REFERENCE / "clinicalsignificance" / "claus_2020.csv"
    require_present(src, "reference data (../shared/reference)", REF_REMEDY)
    with open(src) as f:
        rows = [r for r in csv.DictReader(f) if r["bdi"] not in ("", "NA")]
    e = Events()
    for i, r in enumerate(rows):
        e.q(f"claus_{i}", "BDI-II", total=float(r["bdi"]))
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    e.write(con)
    build(con, inst.load_instruments([inst.INSTRUMENTS_DIR]))

    def beck(total: float) -> str:  # Beck, Steer & Brown (1996) bands
        return "minimal" if total <= 13 else "mild" if total <= 19 else "moderate" if total <= 28 else "severe"

    got = dict(con.execute("select response_id, severity_band from core.questionnaire_scores").fetchall())
    assert len(got) == len(rows) > 100
    assert got == {f"claus_{i}": beck(float(r["bdi"])) for i, r in enumerate(rows)}


def test_malformed_instrument_file_stops_definitions_loading(tmp_path, monkeypatch) -> None:
    """A bad file under $ALLIANCE_INSTRUMENTS_DIR fails the definitions (dg check defs, dg dev),
    naming the file, rather than letting the UI and daemon start and every run fail."""
    from orchestration.definitions import build_definitions

    (tmp_path / "typo.yaml").write_text("code: X\n  bad: [indent\n")
    monkeypatch.setenv("ALLIANCE_INSTRUMENTS_DIR", str(tmp_path))
    with pytest.raises(inst.InstrumentError, match=r"typo\.yaml"):
        build_definitions()
