"""Ingest: contract validation, quarantine reasons, idempotency, crash safety, privacy, conservation."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

from alliance.contract import ContractError, load_contract, parse_contract
from alliance.ingest import ensure_raw_schema, ingest_files, landing_files
from alliance.pseudonyms import is_pseudonym, pseudonym

KEY = b"test-key-0123456789abcdef0123456789"
T = "2025-03-03T09:00:00+01:00"


def ev(event_id: str, event_type: str, **kw) -> dict:
    base = {"event_id": event_id, "event_type": event_type, "schema_version": 1, "occurred_at": T,
            "source": "test", "clinic_id": "clinic-01", "patient_id": "PAT-SECRET-1",
            "episode_id": "EPI-SECRET-1", "payload": {}}
    base.update(kw)
    return base


def questionnaire(event_id: str, instrument: str, answers: object, version: str = "1",
                  **kw) -> dict:
    return ev(event_id, "questionnaire.submitted", session_id="SES-SECRET-1", payload={
        "instrument": instrument, "instrument_version": version, "respondent": "patient",
        "administered_at": T, "answers": answers, **kw})


def phq9(event_id: str, answers: dict, **kw) -> dict:
    return questionnaire(event_id, "PHQ-9", answers, **kw)


def write(path: Path, rows: list, gz: bool = False) -> Path:
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


GOOD = [
    ev("e1", "episode.opened", payload={"age_group": "adult", "clinician_note": "free text"}),
    ev("e2", "therapist.assigned", therapist_id="THR-SECRET-1", payload={"role": "primary"}),
    ev("e3", "session.attended", session_id="SES-SECRET-1", payload={"modality": "video"}),
    phq9("e4", {str(i): 1 for i in range(1, 10)}),
]
BAD = {  # line content -> expected (reason_code, field)
    '{"event_id": "x1", "event_type"': ("malformed_json", None),
    json.dumps(ev("x2", "session.teleported")): ("unknown_event_type", "event_type"),
    json.dumps(ev("x3", "session.attended")): ("missing_field", "session_id"),
    json.dumps(ev("x4", "episode.opened", schema_version="one", payload={"age_group": "adult"})):
        ("wrong_type", "schema_version"),
    json.dumps(phq9("x5", {"1": 7})): ("answer_out_of_range", "payload.answers.1"),
    json.dumps(phq9("x6", {"42": 1})): ("unknown_item", "payload.answers.42"),
    # an item key given twice (valid JSON; which answer counts would be arbitrary)
    json.dumps(phq9("x6b", {"1": 1, "2": 0})).replace('"2": 0', '"1": 2'):
        ("invalid_value", "payload.answers.1"),
    # ... the first of two violations of one item, in document order
    json.dumps(phq9("x6c", {"1": 7, "2": 0})).replace('"2": 0', '"1": 2'):
        ("answer_out_of_range", "payload.answers.1"),
    # an item key that is not a number (was accepted: no order for the first violation)
    json.dumps(phq9("x6d", {"x": 1})): ("unknown_item", "payload.answers"),  # a non-number key is not repeated
    json.dumps(ev("x7", "questionnaire.submitted", payload={
        "instrument": "NOPE-1", "instrument_version": "1", "respondent": "patient",
        "administered_at": T, "answers": {"1": 1}})): ("unknown_instrument", "payload.instrument"),
    json.dumps(ev("x8", "episode.closed", payload={"reason": "bored"})): ("invalid_value", "payload.reason"),
    json.dumps(ev("x9", "episode.opened", occurred_at="2025-03-03 09:00", payload={"age_group": "adult"})):
        ("invalid_value", "occurred_at"),
    json.dumps(ev("e1", "episode.opened", payload={"age_group": "child"})): ("conflicting_duplicate", "event_id"),
    "[1, 2, 3]": ("not_an_object", None),
    json.dumps(ev("x10", "episode.opened", schema_version=9, payload={"age_group": "adult"})):
        ("unsupported_schema_version", "schema_version"),
    json.dumps(ev("x11", "questionnaire.submitted", payload={
        "instrument": "PHQ-9", "instrument_version": "1", "respondent": "patient",
        "administered_at": T})): ("missing_answers", "payload.answers"),
    json.dumps(ev("x12", "questionnaire.submitted", payload={
        "instrument": "PHQ-9", "instrument_version": "1", "respondent": "patient",
        "administered_at": T, "answers": {}})): ("missing_answers", "payload.answers"),
    json.dumps(ev("x13", "questionnaire.submitted", payload={
        "instrument": "BDI-II", "instrument_version": "1", "respondent": "patient",
        "administered_at": T, "total": 12.5})): ("answer_out_of_range", "payload.total"),
    # sixth-session review: free text in an event reference, a blank identifier (it merged every
    # blank-id event of a clinic into one patient), an impossible UTC offset (it shifted the
    # time), answers that are all null, an answer a hair off the item's step
    json.dumps(ev("x14", "questionnaire.retracted", payload={
        "retracts_event_id": "wrong patient: meant John Smith 0612345678",
        "reason": "wrong_patient"})): ("invalid_value", "payload.retracts_event_id"),
    json.dumps(ev("x15", "session.attended", patient_id="   ", session_id="SES-2",
                  payload={"modality": "video"})): ("missing_field", "patient_id"),
    json.dumps(ev("x16", "episode.opened", episode_id="", payload={"age_group": "adult"})):
        ("missing_field", "episode_id"),
    json.dumps(ev("x17", "episode.opened", occurred_at="2025-03-03T09:00:00+25:00",
                  payload={"age_group": "adult"})): ("invalid_value", "occurred_at"),
    json.dumps(phq9("x18", {str(i): None for i in range(1, 10)})):
        ("missing_answers", "payload.answers"),
    json.dumps(phq9("x19", {"1": 2.9999999})): ("answer_out_of_range", "payload.answers.1"),
    # seventh session: DuckDB reads 24:00:00 as the next day and year 0000 as 1 BC (accepted,
    # and stored as another time than the one sent)
    json.dumps(ev("x20", "episode.opened", occurred_at="2025-03-03T24:00:00+01:00",
                  payload={"age_group": "adult"})): ("invalid_value", "occurred_at"),
    json.dumps(ev("x21", "session.scheduled", session_id="SES-3",
                  payload={"scheduled_for": "0000-03-03T09:00:00Z"})):
        ("invalid_value", "payload.scheduled_for"),
    # a comma before a closing brace or bracket (DuckDB's reader accepts it; JSON does not), in
    # the envelope, in the payload, and spaced
    json.dumps(ev("x22", "episode.opened", payload={"age_group": "adult"}))[:-1] + ",}":
        ("malformed_json", None),
    json.dumps(ev("x23", "episode.closed", payload={"reason": "planned"}),
               separators=(",", ":")).replace('"planned"}', '"planned",}'): ("malformed_json", None),
    json.dumps(ev("x24", "episode.opened", payload={"age_group": "adult"}), indent=1)
        .replace("\n", "").replace('"adult"', '"adult" ,'): ("malformed_json", None),
    # ... where a number's longer re-spelling (1e2 -> 100.0) makes up for the comma and space
    json.dumps(ev("x25", "episode.opened", payload={"age_group": "adult", "x": 7}),
               separators=(",", ":")).replace('"x":7}', '"x":1e2}, '): ("malformed_json", None),
    # a schema version beyond bigint (cast to NULL, it passed the rule and stopped the ingest)
    json.dumps(ev("x27", "episode.opened", payload={"age_group": "adult"})).replace(
        '"schema_version": 1', '"schema_version": 10000000000000000000000'):
        ("unsupported_schema_version", "schema_version"),
    # seconds are required (DuckDB's cast reads no time without them)
    json.dumps(ev("x26", "episode.opened", occurred_at="2025-03-03T09:00+01:00",
                  payload={"age_group": "adult"})): ("invalid_value", "occurred_at"),
    # eighth session: an identifier padded with whitespace or holding an invisible character
    # looks like another one but pseudonymised to another patient (one patient split in two)
    json.dumps(ev("x28", "episode.opened", patient_id="PAT-SECRET-1 ",
                  payload={"age_group": "adult"})): ("invalid_value", "patient_id"),
    json.dumps(ev("x29", "episode.opened", episode_id=" EPI-SECRET-1",
                  payload={"age_group": "adult"})): ("invalid_value", "episode_id"),
    json.dumps(ev("x30", "therapist.assigned", therapist_id="THR-SECRET-1\t",
                  payload={"role": "primary"})): ("invalid_value", "therapist_id"),
    json.dumps(ev("x31", "session.attended", session_id="SES-\u200bSECRET-1",
                  payload={"modality": "video"})): ("invalid_value", "session_id"),  # escaped
    json.dumps(ev("x32", "session.attended", session_id="SES-\u200bSECRET-1",
                  payload={"modality": "video"}), ensure_ascii=False): ("invalid_value", "session_id"),
    json.dumps(ev("x33", "episode.opened", patient_id="PAT-SECRET-1\u00a0",  # no-break space
                  payload={"age_group": "adult"}), ensure_ascii=False): ("invalid_value", "patient_id"),
    json.dumps(ev("x34", "episode.opened", patient_id="\ufeffPAT-SECRET-1",  # byte order mark
                  payload={"age_group": "adult"}), ensure_ascii=False): ("invalid_value", "patient_id"),
    json.dumps(ev("x35", "episode.opened", patient_id="PAT-SECRET-1\x7f",  # DEL, raw in JSON
                  payload={"age_group": "adult"}), ensure_ascii=False): ("invalid_value", "patient_id"),
    json.dumps(ev("x36", "episode.opened", patient_id="PAT-SECRET-1\u3164",  # Hangul filler
                  payload={"age_group": "adult"}), ensure_ascii=False): ("invalid_value", "patient_id"),
    json.dumps(ev("x37", "episode.opened", episode_id="EPI-\u2800SECRET-1",  # Braille blank
                  payload={"age_group": "adult"}), ensure_ascii=False): ("invalid_value", "episode_id"),
}


@pytest.fixture()
def con(tmp_path):
    c = duckdb.connect(str(tmp_path / "w.duckdb"))
    yield c
    c.close()


def test_contract_loads_and_rejects_malformed():
    c = load_contract()
    assert {"episode.opened", "questionnaire.retracted"} <= set(c.event_types)
    assert c.envelope["event_id"].required
    with pytest.raises(ContractError, match="needs a type"):
        parse_contract({"contract_version": 1, "envelope": {"x": {"type": "nope"}},
                        "event_types": {}, "quarantine_reasons": {}}, "bad.yaml")


def test_every_bad_kind_is_quarantined_with_reason_file_line_and_field(con, tmp_path):
    rows = GOOD + list(BAD) + [json.dumps(GOOD[2])]  # last line: exact duplicate
    f = write(tmp_path / "landing" / "export-1.ndjson", rows)
    [res] = ingest_files(con, [f], KEY, quarantine_dir=tmp_path / "q")
    assert (res.accepted, res.duplicates, res.quarantined) == (len(GOOD), 1, len(BAD))
    assert res.lines_read == res.accepted + res.duplicates + res.quarantined
    got = {r[0]: r[1:] for r in con.execute(
        "select line_number, reason_code, field, message from raw.quarantine").fetchall()}
    for i, (_line, (reason, field)) in enumerate(BAD.items()):
        line_no = len(GOOD) + i + 1
        assert got[line_no][0] == reason, (line_no, got[line_no])
        assert got[line_no][1] == field
        assert got[line_no][2].startswith(f"export-1.ndjson line {line_no}:")
    # the verbatim lines are kept, outside the warehouse
    kept = [json.loads(x) for x in (tmp_path / "q" / f"{res.sha256}.ndjson").read_text().splitlines()]
    assert len(kept) == len(BAD)
    # free text outside the allow-list is dropped and counted
    payload, dropped = con.execute(
        "select payload, dropped_fields from raw.events where event_id = 'e1'").fetchone()
    assert json.loads(payload) == {"age_group": "adult"} and dropped == 1


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_line(con, tmp_path):
    f = tmp_path / "landing" / "bom.ndjson"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD[0]) + "\n" + json.dumps(GOOD[1]) + "\n").encode())
    [res] = ingest_files(con, [f], KEY)
    assert (res.accepted, res.quarantined) == (2, 0)


def test_a_comma_and_bracket_inside_a_string_is_no_trailing_comma(con, tmp_path):
    note = ev("n1", "episode.opened", payload={"age_group": "adult", "note": 'a ,} b ,] c \\",}'})
    spaced = json.dumps(ev("n2", "episode.opened", payload={"age_group": "adult"}), indent=1)
    f = write(tmp_path / "landing" / "commas.ndjson",
              [json.dumps(note), json.dumps(note, separators=(",", ":")).replace("n1", "n3"),
               spaced.replace("\n", " ")])
    [res] = ingest_files(con, [f], KEY)
    assert (res.accepted, res.quarantined, res.dropped_fields) == (3, 0, 2)


def test_a_line_may_start_with_any_json_whitespace(con, tmp_path):
    f = write(tmp_path / "landing" / "ws.ndjson",
              ["\t" + json.dumps(GOOD[0]), "  " + json.dumps(GOOD[1])])
    [res] = ingest_files(con, [f], KEY)
    assert (res.accepted, res.quarantined) == (2, 0)


@pytest.mark.parametrize(("line", "kept", "dropped"), [
    # allow-listed keys only, in any order and spacing: nothing dropped
    ('{"modality": "video", "duration_minutes": 50}', {"modality": "video", "duration_minutes": 50}, 0),
    ('{}', {}, 0),
    # another key, however short, or a key of another event type's payload: dropped and counted
    ('{"modality":"video","x":1}', {"modality": "video"}, 1),
    ('{"modality":"video","total":1}', {"modality": "video"}, 1),
    ('{"x":1}', {}, 1),
    # an allow-listed key set to null (kept as sent), an escaped key, a duplicate key
    ('{"modality":"video","duration_minutes":null}', {"modality": "video", "duration_minutes": None}, 0),
    ('{"mod\\u0061lity":"video","note":"free"}', {"modality": "video"}, 1),
    ('{"modality":"video","modality":"phone"}', None, 1),  # one value is dropped
])
def test_dropped_fields_counted_whatever_the_payload_shape(con, tmp_path, line, kept, dropped):
    """The parse skips listing a payload's keys when its allow-listed keys account for all of it;
    every other shape must still be counted from the keys themselves."""
    env = json.dumps(ev("p1", "session.attended", session_id="SES-SECRET-1"))
    f = write(tmp_path / "a.ndjson", [env.replace('"payload": {}', '"payload": ' + line)])
    [res] = ingest_files(con, [f], KEY, instruments=None)
    assert res.accepted == 1, res
    payload, n = con.execute("select payload, dropped_fields from raw.events").fetchone()
    assert n == dropped and res.dropped_fields == dropped
    if kept is not None:
        assert json.loads(payload) == kept


def test_reingest_is_noop_and_changed_file_counts_duplicates(con, tmp_path):
    f = write(tmp_path / "a.ndjson", GOOD)
    ingest_files(con, [f], KEY, instruments=None)
    before = con.execute("select count(*) from raw.events").fetchone()[0]
    [again] = ingest_files(con, [f], KEY, instruments=None)
    assert again.status == "already_ingested"
    assert con.execute("select count(*) from raw.events").fetchone()[0] == before
    assert con.execute("select count(*) from raw.ingested_files").fetchone()[0] == 1
    # the same events re-sent in a changed file (plus one new) are counted as duplicates
    f2 = write(tmp_path / "b.ndjson.gz", GOOD + [ev("e9", "session.no_show", session_id="S9")], gz=True)
    [r2] = ingest_files(con, [f2], KEY, instruments=None)
    assert (r2.accepted, r2.duplicates, r2.quarantined) == (1, len(GOOD), 0)


def test_identifiers_are_pseudonymised_and_no_raw_identifier_reaches_the_warehouse(con, tmp_path):
    f = write(tmp_path / "a.ndjson", GOOD + list(BAD))
    ingest_files(con, [f], KEY, quarantine_dir=tmp_path / "q")
    pid = con.execute("select distinct patient_id from raw.events").fetchall()
    assert pid == [(pseudonym(KEY, "patient", "clinic-01", "PAT-SECRET-1"),)]
    assert is_pseudonym(pid[0][0], "patient")
    text_cols = con.execute(
        "select schema_name, table_name, column_name from duckdb_columns() "
        "where data_type in ('VARCHAR', 'JSON') and schema_name = 'raw'").fetchall()
    for schema, table, col in text_cols:
        hits = con.execute(
            f'select count(*) from {schema}.{table} where "{col}"::varchar like \'%SECRET%\' '
            f"or \"{col}\"::varchar like '%free text%'").fetchone()[0]
        assert hits == 0, f"raw identifier or free text in {schema}.{table}.{col}"


# Free text or a raw identifier where the contract expects something else: every such line is
# quarantined, and nothing of it may reach a text column of the warehouse (raw.quarantine
# included: its redacted copy repeats only values that pass their own field's checks).
LEAKY = [
    ev("e-leak-1", "Jane Doe SECRET-T phoned about her results"),  # event_type
    ev("e-leak-2", "session.attended", session_id="SES-SECRET-1",
       occurred_at="yesterday with SECRET-O", payload={}),
    ev("e-leak-3", "session.attended", session_id="SES-SECRET-1", source="EHR export for SECRET-S",
       payload={}),
    ev("SECRET-E event for Jane", "session.attended", session_id="SES-SECRET-1", payload={}),
    ev("e-leak-5", "session.attended", session_id="SES-SECRET-1", clinic_id="Clinic SECRET-C",
       payload={}),
    ev("e-leak-6", "episode.opened", schema_version="SECRET-V", payload={"age_group": "adult"}),
    ev("e-leak-7", "episode.opened", payload={"age_group": "nope", "SECRET-K note": "x"}),
    phq9("e-leak-8", {"SECRET-A": 1}),
    ev("e-leak-9", "questionnaire.submitted", session_id="SES-SECRET-1", payload={
        "instrument": "SECRET-I Jane", "instrument_version": "1", "respondent": "patient",
        "administered_at": T, "answers": {"1": 1}}),
    # identifier-shaped values that pass a code pattern (seventh-session privacy review): an
    # instrument code, a version, a long schema version (a record number sent in the wrong field)
    ev("e-leak-10", "questionnaire.submitted", session_id="SES-SECRET-1", payload={
        "instrument": "PAT-SECRET-10", "instrument_version": "1", "respondent": "patient",
        "administered_at": T, "answers": {"1": 1}}),
    phq9("e-leak-11", {"1": 1}, instrument_version="SECRET-11"),
    ev("e-leak-12", "episode.opened", schema_version=48392011, payload={"age_group": "adult"}),
]


def test_free_text_in_rejected_lines_stays_out_of_the_warehouse(con, tmp_path):
    f = write(tmp_path / "leaky.ndjson", GOOD + LEAKY)
    [r] = ingest_files(con, [f], KEY, quarantine_dir=tmp_path / "q")
    assert (r.accepted, r.quarantined) == (len(GOOD), len(LEAKY))
    text_cols = con.execute(
        "select schema_name, table_name, column_name from duckdb_columns() "
        "where data_type in ('VARCHAR', 'JSON') and schema_name = 'raw'").fetchall()
    for schema, table, col in text_cols:
        hits = con.execute(f'select "{col}"::varchar from {schema}.{table} '
                           f"where \"{col}\"::varchar like '%SECRET%' or \"{col}\"::varchar like '%Jane%'"
                           ).fetchall()
        assert hits == [], f"free text in {schema}.{table}.{col}: {hits[:2]}"
    assert con.execute("select count(*) from raw.quarantine where message like '%48392011%' "
                       "or line_redacted like '%48392011%'").fetchone()[0] == 0
    # a defined instrument with an unknown version still says which instrument, and what is defined
    msg = con.execute("select message from raw.quarantine where event_id = 'e-leak-11'").fetchone()[0]
    assert "instrument 'PHQ-9' has no version as sent in schemas/instruments (defined: 1)" in msg
    # what can be repeated still is: the valid event id, type and clinic of a line
    row = con.execute("select event_id, event_type, clinic_id, line_redacted from raw.quarantine "
                      "where line_number = ?", [len(GOOD) + 7]).fetchone()
    assert row[:3] == ("e-leak-7", "episode.opened", "clinic-01")
    redacted = json.loads(row[3])
    assert redacted["payload_keys"] == ["age_group"] and redacted["other_payload_keys"] == 1
    # the verbatim lines are in the quarantine file, outside the warehouse
    assert len((tmp_path / "q").read_text().splitlines()) == len(LEAKY) if (tmp_path / "q").is_file() \
        else sum(len(p.read_text().splitlines()) for p in (tmp_path / "q").iterdir()) == len(LEAKY)


def test_landing_skips_files_still_being_written(tmp_path):
    write(tmp_path / "a.ndjson", GOOD)
    write(tmp_path / "b.ndjson.part", GOOD)
    write(tmp_path / "c.ndjson.tmp", GOOD)
    write(tmp_path / "notes.txt", ["hello"])
    assert [p.name for p in landing_files(tmp_path)] == ["a.ndjson"]


def test_a_file_gone_before_it_is_read_is_noted_and_the_others_ingested(con, tmp_path):
    files = [write(tmp_path / f"f{i}.ndjson", [json.dumps({**ev(f"g{i}", "episode.opened",
                                                              payload={"age_group": "adult"})})])
             for i in range(3)]
    files[1].unlink()  # listed by the sensor or the run, then moved away
    results = ingest_files(con, files, KEY, instruments=None)
    status = {Path(r.path).name: r for r in results}
    assert {n: r.status for n, r in status.items()} == {
        "f0.ndjson": "ingested", "f1.ndjson": "vanished", "f2.ndjson": "ingested"}
    assert "vanished before it was read" in status["f1.ndjson"].error
    assert con.execute("select count(*) from raw.ingested_files").fetchone()[0] == 2
    write(files[1], [json.dumps(ev("g1", "episode.opened", payload={"age_group": "adult"}))])
    [back] = ingest_files(con, [files[1]], KEY, instruments=None)
    assert back.status == "ingested" and back.accepted == 1


def test_unreadable_file_is_recorded_not_lost(con, tmp_path):
    bad = tmp_path / "broken.ndjson.gz"
    bad.write_bytes(b"not gzip at all")
    # a gzip header with a damaged deflate stream (zlib.error, not OSError: it stopped the ingest)
    good = gzip.compress(("\n".join(json.dumps(e) for e in GOOD) + "\n").encode() * 20)
    damaged = tmp_path / "damaged.ndjson.gz"
    damaged.write_bytes(good[:20] + bytes(b ^ 0x55 for b in good[20:40]) + good[40:])
    fine = write(tmp_path / "fine.ndjson", GOOD)
    results = ingest_files(con, [bad, damaged, fine], KEY, instruments=None)
    assert [r.status for r in results] == ["unreadable", "unreadable", "ingested"]
    assert all("cannot decompress" in r.error for r in results[:2])
    assert con.execute("select list(status order by file_id) from raw.ingested_files"
                       ).fetchone()[0] == ["unreadable", "unreadable", "ingested"]


def crash_script(statement: str, nth: int, pattern: str, max_lines: int) -> str:
    """A script that ingests the files matching `pattern` (argv[2]) into argv[1] and dies
    (SIGKILL-like, no cleanup, exit 9) when it sends its `nth` statement starting with
    `statement`."""
    return textwrap.dedent(f"""
        import os, sys, duckdb
        from pathlib import Path
        from alliance.ingest import ingest_files

        class Crashing:
            def __init__(self, con):
                self.con, self.seen = con, 0
            def execute(self, sql, *a):
                if sql.strip().startswith({statement!r}):
                    self.seen += 1
                    if self.seen == {nth}:
                        os._exit(9)
                return self.con.execute(sql, *a)
            def __getattr__(self, name):
                return getattr(self.con, name)

        con = duckdb.connect(sys.argv[1])
        files = sorted(Path(sys.argv[2]).glob({pattern!r}))
        ingest_files(Crashing(con), files, b"k" * 32, instruments=None,
                     max_lines_per_transaction={max_lines})
    """)


# Dies in the third transaction, while writing its manifest rows (one file per transaction).
CRASH_SCRIPT = crash_script("insert into raw.ingested_files", 3, "*.ndjson", 5)


def test_crash_mid_ingest_then_rerun_equals_uninterrupted_run(tmp_path):
    landing = tmp_path / "landing"
    for d in range(4):
        rows = [ev(f"d{d}-{i}", "session.no_show", session_id=f"S{d}-{i}") for i in range(4)]
        rows.append(json.dumps(ev(f"d{d}-bad", "bogus")))
        write(landing / f"export-{d}.ndjson", rows)
    crashed_db = tmp_path / "crashed.duckdb"
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(crashed_db), str(landing)])
    assert proc.returncode == 9  # it really died mid-transaction
    files = sorted(landing.glob("*.ndjson"))
    with duckdb.connect(str(crashed_db)) as c:
        partial = c.execute("select count(*) from raw.ingested_files").fetchone()[0]
        assert 0 < partial < 4  # first group committed, second lost as a whole
        ingest_files(c, files, b"k" * 32, instruments=None, max_lines_per_transaction=5)
        crashed = _counts(c)
    with duckdb.connect(str(tmp_path / "clean.duckdb")) as c:
        ingest_files(c, files, b"k" * 32, instruments=None)
        clean = _counts(c)
    assert crashed == clean


def _counts(c) -> tuple:
    return c.execute(
        "select (select count(*) from raw.events), (select count(*) from raw.quarantine), "
        "(select list(sha256 order by sha256) from raw.ingested_files), "
        "(select sum(accepted) from raw.ingested_files), "
        "(select list(event_id order by event_id) from raw.events)").fetchone()


def test_schema_is_documented(con):
    ensure_raw_schema(con)
    n = con.execute("select count(*) from duckdb_columns() where schema_name = 'raw' "
                    "and table_name = 'events' and comment is not null and comment <> ''").fetchone()[0]
    assert n >= 15


def test_schema_documentation_is_rewritten_only_where_it_differs(con):
    """A warehouse whose comments were changed or lost gets the current text back; an
    up-to-date one gets no catalog writes at all (the check runs before every ingest)."""
    from alliance.ingest import COLUMN_COMMENTS, TABLE_COMMENTS

    ensure_raw_schema(con)
    con.execute("comment on column raw.events.source is 'stale'")
    con.execute("comment on table raw.quarantine is null")
    ensure_raw_schema(con)
    assert con.execute("select comment from duckdb_columns() where schema_name = 'raw' and "
                       "table_name = 'events' and column_name = 'source'").fetchone()[0] \
        == COLUMN_COMMENTS["raw.events"]["source"]
    assert con.execute("select comment from duckdb_tables() where schema_name = 'raw' and "
                       "table_name = 'quarantine'").fetchone()[0] == TABLE_COMMENTS["raw.quarantine"]

    statements: list[str] = []

    class Recording:
        def execute(self, sql, *args):
            statements.append(sql)
            return con.execute(sql, *args)

    ensure_raw_schema(Recording())
    assert not [s for s in statements if not s.lstrip().lower().startswith("select")], statements


def test_contract_docs_are_generated_from_the_contract():
    from alliance.config import REPO_ROOT
    from alliance.contract import contract_markdown

    assert (REPO_ROOT / "docs" / "event-contract.md").read_text() == contract_markdown(), (
        "docs/event-contract.md is stale: run `alliance contract-docs`"
    )


def test_blank_and_whitespace_lines_are_counted_not_quarantined(con, tmp_path):
    """Empty and whitespace-only lines (spaces, tabs, CRLF endings, Unicode spaces) are blank;
    line numbers still count them."""
    good = [json.dumps(ev(f"b{i}", "session.no_show", session_id=f"S{i}")) for i in range(3)]
    text = (good[0] + "\r\n" + "\r\n" + "   \t \r\n" + good[1] + "\n" + "\u00a0\u2003\n" + "\n"
            + " x \n" + good[2] + "\n")
    f = tmp_path / "blank.ndjson"
    f.write_bytes(text.encode())
    [r] = ingest_files(con, [f], KEY, instruments=None)
    assert (r.lines_read, r.accepted, r.quarantined, r.blank_lines) == (4, 3, 1, 4)
    assert con.execute("select line_number from raw.events order by 1").fetchall() == [
        (1,), (4,), (8,)]
    assert con.execute("select line_number, reason_code from raw.quarantine").fetchall() == [
        (7, "malformed_json")]


def test_invalid_utf8_line_is_quarantined_and_kept_verbatim(con, tmp_path):
    import base64

    bad = b'{"event_id": "\xff\xfe", "event_type": "session.no_show"}'
    # an undecodable last line without a newline is a line too (it was dropped)
    last = tmp_path / "last.ndjson"
    last.write_bytes(json.dumps(GOOD[1]).encode() + b"\n" + bad)
    [r] = ingest_files(con, [last], KEY, instruments=None)
    assert (r.lines_read, r.accepted, r.quarantined) == (2, 1, 1)
    f = tmp_path / "enc.ndjson"
    f.write_bytes(json.dumps(GOOD[0]).encode() + b"\n" + bad + b"\n\n")
    [r] = ingest_files(con, [f], KEY, instruments=None, quarantine_dir=tmp_path / "q")
    assert (r.accepted, r.quarantined, r.blank_lines) == (1, 1, 1)
    assert con.execute("select source_file, line_number, reason_code from raw.quarantine "
                       "order by all").fetchall() == [
        ("enc.ndjson", 2, "invalid_encoding"), ("last.ndjson", 2, "invalid_encoding")]
    kept = json.loads((tmp_path / "q" / f"{r.sha256}.ndjson").read_text())
    assert base64.b64decode(kept["line_base64"]) == bad


def test_key_is_required_outside_demo_and_must_be_long(monkeypatch, tmp_path):
    from alliance.pseudonyms import MissingKeyError, load_key

    monkeypatch.delenv("ALLIANCE_PSEUDONYM_KEY", raising=False)
    with pytest.raises(MissingKeyError, match="is not set"):
        load_key(None)
    demo = load_key(tmp_path / "secrets" / "k")  # demo mode creates and reuses a local key
    assert demo == load_key(tmp_path / "secrets" / "k") and len(demo) >= 32
    monkeypatch.setenv("ALLIANCE_PSEUDONYM_KEY", "short")
    with pytest.raises(MissingKeyError, match="at least 32"):
        load_key(None)


def test_unreadable_file_is_recorded_once(con, tmp_path):
    bad = tmp_path / "broken.ndjson.gz"
    bad.write_bytes(b"not gzip at all")
    ingest_files(con, [bad], KEY, instruments=None)
    [again] = ingest_files(con, [bad], KEY, instruments=None)
    assert again.status == "already_ingested"
    assert con.execute("select count(*) from raw.ingested_files").fetchone()[0] == 1


@pytest.mark.parametrize("ascii_only", [True, False], ids=["escaped", "raw-utf8"])
@pytest.mark.parametrize("key", [KEY, b"k" * 80], ids=["key-32", "key-longer-than-a-block"])
def test_sql_pseudonyms_equal_the_python_hmac(tmp_path, key, ascii_only):
    """The ingest computes HMAC-SHA256 in DuckDB; it must equal alliance.pseudonyms for every kind,
    whether non-ASCII identifiers arrive as JSON escapes or as raw UTF-8 (and with quotes)."""
    row = ev("e1", "session.attended", patient_id="PAT-Ü-1", therapist_id='TH|"2"',
             episode_id="EP-1", session_id="SES-é😀")
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    line = json.dumps(row, ensure_ascii=ascii_only)
    ingest_files(con, [write(tmp_path / "a.ndjson", [line])], key, instruments=None)
    got = con.execute(
        "select patient_id, therapist_id, episode_id, session_id from raw.events").fetchone()
    assert got == tuple(pseudonym(key, kind, "clinic-01", row[f"{kind}_id"])
                        for kind in ("patient", "therapist", "episode", "session"))


# Dies at the second commit: the first transaction is in, the second is lost.
UNREADABLE_CRASH_SCRIPT = crash_script("commit", 2, "*", 4)


def test_crash_then_rerun_numbers_files_as_an_uninterrupted_run_unreadable_ones_too(tmp_path):
    landing = tmp_path / "landing"
    for name in ("a", "b", "d", "e"):
        write(landing / f"{name}.ndjson",
              [ev(f"{name}{i}", "session.no_show", session_id=f"S{name}{i}") for i in range(4)])
    (landing / "c.ndjson.gz").write_bytes(b"not gzip at all")
    files = sorted(landing.iterdir())

    def ids(c) -> list[tuple]:
        return c.execute("select file_name, file_id, status from raw.ingested_files "
                         "order by file_name").fetchall()

    crashed_db = tmp_path / "crashed.duckdb"
    proc = subprocess.run([sys.executable, "-c", UNREADABLE_CRASH_SCRIPT, str(crashed_db),
                           str(landing)])
    assert proc.returncode == 9
    with duckdb.connect(str(crashed_db)) as c:
        assert 0 < len(ids(c)) < 5
        ingest_files(c, files, b"k" * 32, instruments=None, max_lines_per_transaction=4)
        crashed = (ids(c), c.execute("select file_id, line_number from raw.events order by all")
                   .fetchall())
    with duckdb.connect(str(tmp_path / "clean.duckdb")) as c:
        ingest_files(c, files, b"k" * 32, instruments=None)
        clean = (ids(c), c.execute("select file_id, line_number from raw.events order by all")
                 .fetchall())
    assert crashed == clean
    assert [r[1] for r in clean[0]] == [1, 2, 3, 4, 5]  # in file order, the unreadable one too
    assert ("c.ndjson.gz", 3, "unreadable") in clean[0]


def test_identifiers_with_inner_spaces_or_letters_beyond_ascii_are_kept(con, tmp_path):
    """The identifier rule rejects only padding and invisible or control characters: an inner
    space and letters beyond ASCII are identifiers as sent, and an escaped letter (\\u00d8) is the
    same identifier as the letter itself (one pseudonym)."""
    rows = [ev("k1", "episode.opened", patient_id="PAT 0001", payload={"age_group": "adult"}),
            ev("k2", "episode.opened", patient_id="PAT-\u00d8RSTED", episode_id="EPI-2",
               payload={"age_group": "adult"})]
    lines = [json.dumps(rows[0]), json.dumps(rows[1], ensure_ascii=False),
             json.dumps({**rows[1], "event_id": "k3", "episode_id": "EPI-3"})]  # \u00d8 escaped
    assert "\\u00d8" in lines[2] and "\u00d8" in lines[1]
    f = write(tmp_path / "landing" / "ids.ndjson", lines)
    [res] = ingest_files(con, [f], KEY)
    assert (res.accepted, res.quarantined) == (3, 0)
    got = dict(con.execute("select event_id, patient_id from raw.events").fetchall())
    assert got["k1"] == pseudonym(KEY, "patient", "clinic-01", "PAT 0001")
    assert got["k2"] == got["k3"] == pseudonym(KEY, "patient", "clinic-01", "PAT-\u00d8RSTED")


def _answer_lines(seed: int = 7) -> list[str]:
    """Questionnaire lines for every item-level instrument: plain valid answers, valid ones in
    other shapes (keys out of order, nulls, 3.0 for 3) and near misses of every answer rule."""
    import random

    from alliance.instruments import load_instruments

    rnd = random.Random(seed)
    lines = []
    for inst in sorted(load_instruments().values(), key=lambda i: i.key):
        if inst.kind != "item_level":
            continue
        items = {str(it.number): it for it in inst.items}

        def line(answers_json: str, n: int, code: str = inst.code, version: str = inst.version) -> str:
            base = json.dumps(questionnaire(f"{code}-{n}", code, "ANSWERS", version))
            return base.replace('"ANSWERS"', answers_json)

        def value(it, k: int) -> float:
            return round(it.min_value + k * it.step, 6)

        n = 0
        for _ in range(40):  # valid, keys in order: what the shortcut recognises
            keys = sorted(rnd.sample(list(items), rnd.randint(1, len(items))), key=int)
            ans = {k: None if rnd.random() < 0.1 else value(items[k], rnd.randint(
                0, round((items[k].max_value - items[k].min_value) / items[k].step))) for k in keys}
            n += 1
            lines.append(line(json.dumps(ans, separators=(",", ":")), n))
        first, it = next(iter(items.items()))
        odd = [  # each breaks one rule, or is valid in a shape the shortcut leaves to the rules
            f'{{"{first}":{value(it, 0)},"{first}":{value(it, 0)}}}',  # repeated key
            f'{{"{first}":{it.max_value + it.step}}}', f'{{"{first}":{it.min_value - it.step}}}',
            f'{{"{first}":{it.max_value + 1}}}', f'{{"{first}":{it.min_value + it.step / 2}}}',
            f'{{"{first}":{int(it.max_value)}.00}}', f'{{"{first}":1e0}}', f'{{"{first}":-0}}',
            f'{{"{first}":"1"}}', f'{{"{first}":true}}', f'{{"{first}":{{"a":1}}}}',
            f'{{"{first}":[1]}}', f'{{"0":{value(it, 0)}}}', f'{{"{len(items) + 1}":{value(it, 0)}}}',
            f'{{"0{first}":{value(it, 0)}}}', '{"x":1}', '{"1 ":1}',
            "{" + ",".join(f'"{k}":{value(v, 0)}' for k, v in reversed(items.items())) + "}",
            "{" + ",".join(f'"{k}":null' for k in items) + "}",
            f'{{"{first}":{int(it.max_value)}.0}}', f'{{"{first}":{it.max_value}0}}',
        ]
        for text in odd:
            n += 1
            lines.append(line(text, n))
    return lines


def test_the_plain_answers_shortcut_never_hides_an_answer_violation(tmp_path, monkeypatch):
    """The ingest skips the per-answer rules for answers objects one regular expression per
    instrument recognises as plain. With the shortcut and without it (every object through the
    rules), the same lines are accepted and quarantined with the same reasons and messages; and
    the shortcut does recognise the plain objects (or it would cost without saving)."""
    import alliance.ingest as ingest_mod
    from alliance.instruments import load_instruments

    lines = _answer_lines()
    f = write(tmp_path / "landing" / "answers.ndjson", lines)
    outcomes = []
    for name in ("with", "without"):
        if name == "without":
            monkeypatch.setattr(ingest_mod, "_plain_answers_sql", lambda instruments: "false")
        c = duckdb.connect(str(tmp_path / f"{name}.duckdb"))
        [res] = ingest_files(c, [f], KEY)
        outcomes.append((res.accepted, res.quarantined, c.execute(
            "select line_number, reason_code, field, message from raw.quarantine order by all").fetchall(),
            c.execute("select event_id, payload from raw.events order by all").fetchall()))
        c.close()
    assert outcomes[0] == outcomes[1]
    accepted, quarantined, rejected, _ = outcomes[0]
    assert accepted > 200 and quarantined > 60
    assert {r[1] for r in rejected} >= {"answer_out_of_range", "unknown_item", "wrong_type",
                                         "invalid_value"}
    monkeypatch.undo()
    plain = ingest_mod._plain_answers_sql(load_instruments())
    c = duckdb.connect()
    recognised = c.execute(
        f"select count(*) filter (where {plain}) from (select p ->> '$.instrument' as instrument, "
        "p ->> '$.instrument_version' as instrument_version, p -> '$.answers' as p_answers "
        "from (select json_extract(unnest(?::varchar[]), '$.payload') as p))", [lines]).fetchone()[0]
    assert recognised >= 6 * 40  # every in-order valid object of the six item-level instruments


def test_the_plain_answers_shortcut_stays_small_and_exact_for_any_instrument(con, tmp_path):
    """A clinic's own instrument ($ALLIANCE_INSTRUMENTS_DIR) may have hundreds of items: the
    shortcut's expression grows with the items only (a quadratic one, 339 items of 0..1, was
    beyond RE2 and failed every ingest), is left out past PLAIN_ANSWERS_MAX_PATTERN, and is never
    built for values the rules' floating-point step test would reject (10000000.1 in 0.1 steps)."""
    import dataclasses

    import alliance.ingest as ingest_mod
    from alliance.instruments import Item, load_instruments

    base = load_instruments()
    gad7 = base[("GAD-7", "1")]

    def instrument(code: str, n: int, lo: float, hi: float, step: float):
        return dataclasses.replace(gad7, code=code, items=tuple(
            Item(number=i, min_value=lo, max_value=hi, step=step) for i in range(1, n + 1)))

    extra = {("BIG-400", "1"): instrument("BIG-400", 400, 0, 1, 1),
             ("MID-45", "1"): instrument("MID-45", 45, 0, 4, 1),
             ("HUGE-LO", "1"): instrument("HUGE-LO", 3, 10_000_000, 10_000_010, 0.1)}
    instruments = {**base, **extra}
    plain = ingest_mod._plain_answers_sql(instruments)
    assert "'BIG-400'" not in plain and "'HUGE-LO'" not in plain and "'MID-45'" in plain
    assert ingest_mod._answer_value_re(10_000_000, 10_000_010, 0.1) is None
    rows = [questionnaire(f"q{i}", code, answers)
            for i, (code, answers) in enumerate([
                ("BIG-400", {str(i): i % 2 for i in range(1, 401)}),
                ("MID-45", {str(i): i % 5 for i in range(1, 46)}),
                ("MID-45", {"1": 5}),
                ("HUGE-LO", {"1": 10_000_000.1})])]
    f = write(tmp_path / "landing" / "own.ndjson", rows)
    [res] = ingest_files(con, [f], KEY, instruments=instruments)
    got = dict(con.execute("select event_id, reason_code from raw.quarantine").fetchall())
    # (the rules' step test rejects 10000000.1: (x - lo) / 0.1 is not whole in floating point)
    assert (res.accepted, got) == (2, {"q2": "answer_out_of_range", "q3": "answer_out_of_range"})
    recognised = con.execute(
        f"select count(*) filter (where {plain}) from (select 'MID-45' as instrument, "
        "'1' as instrument_version, ?::json as p_answers)",
        [json.dumps({str(i): i % 5 for i in range(1, 46)}, separators=(",", ":"))]).fetchone()[0]
    assert recognised == 1


def test_a_warehouse_of_a_newer_storage_version_gets_the_log_without_named_compression(tmp_path):
    """raw.events names its columns' compression (FSST, dictionary), which DuckDB only reads in
    files of storage version v1.3.0 or later ("that type is deprecated"): such a file gets the
    same tables with DuckDB's own choice, and the ingest works."""
    c = duckdb.connect()
    c.execute(f"attach '{tmp_path / 'new.duckdb'}' as w (storage_version 'v1.3.0')")
    c.execute("use w")
    f = write(tmp_path / "landing" / "export-1.ndjson", GOOD)
    [res] = ingest_files(c, [f], KEY)
    assert res.accepted == len(GOOD)
    c.execute("checkpoint")
    assert c.execute("select count(*) from raw.events").fetchone()[0] == len(GOOD)
    c.close()


def test_schema_versions_are_checked_per_event_type_when_types_differ(con, tmp_path):
    """A contract whose event types support different schema versions: each line is checked
    against its own type's versions (one test per distinct list of versions)."""
    import dataclasses

    c = load_contract()
    types = dict(c.event_types)
    types["episode.opened"] = dataclasses.replace(types["episode.opened"], schema_versions=(1, 2))
    contract = dataclasses.replace(c, event_types=types)
    rows = [ev("v1", "episode.opened", schema_version=2, payload={"age_group": "adult"}),
            ev("v2", "episode.closed", schema_version=2, payload={"reason": "planned"}),
            ev("v3", "episode.closed", schema_version=1, payload={"reason": "planned"})]
    f = write(tmp_path / "landing" / "versions.ndjson", rows)
    [res] = ingest_files(con, [f], KEY, contract=contract)
    assert res.accepted == 2
    assert con.execute("select line_number, reason_code, message from raw.quarantine").fetchall() == [
        (2, "unsupported_schema_version",
         "versions.ndjson line 2: field 'schema_version' version 2 is not supported for episode.closed")]
