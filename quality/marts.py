"""The marts suites: GX checks on the tables analysts read (totals, rates, one row per key).

Which model gets which check is data (quality/suites/marts.yaml); rate columns are found by name
at run time, so a new `*_pct` column in a mart is checked without a code change.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import duckdb

from alliance import yamlio
from quality.gx_runner import CheckOutcome, ExpectationSpec, SuiteResult, validate_frame

MARTS_CONFIG_FILE = Path(__file__).resolve().parent / "suites" / "marts.yaml"
TOTALS_CHECK = "totals_in_instrument_range"
RATES_CHECK = "rates_within_range"
KEY_CHECK = "one_row_per_key"
# Pseudonymous columns that may be shown as failing keys (never free text or raw identifiers).
PSEUDONYM_COLUMNS = ("patient_id", "therapist_id", "episode_id", "session_id", "clinic_id")


@dataclass(frozen=True)
class ModelSuite:
    """What the marts suite checks on one model (asset key `schema/name`)."""

    schema: str
    name: str
    totals: tuple[str, ...] = ()
    key: tuple[str, ...] = ()
    failing_keys: tuple[str, ...] = ()
    # (column regex, min, max): rate columns are found by name at run time
    rate_ranges: tuple[tuple[str, float, float], ...] = ()
    # total column -> instrument code, for totals of a fixed instrument (no instrument column)
    total_instruments: tuple[tuple[str, str], ...] = ()
    checks: tuple[str, ...] = field(default=())

    @property
    def table(self) -> str:
        return f"{self.schema}.{self.name}"


def _sidecar_tests_key(model: Any, key: Sequence[str]) -> bool:
    """True when the model's sidecar already tests `key` for uniqueness (the runner checks it)."""
    for t in getattr(model, "tests", ()):
        test = getattr(t, "test", "")
        if test == "unique" and list(key) == [getattr(t, "column", None)]:
            return True
        if test == "unique_combination":
            # the runner keeps the column list only in its compiled SQL (`group by "a", "b"`)
            grouped = str(getattr(t, "failing_sql", "")).partition("group by")[2]
            grouped = grouped.partition("having")[0]
            cols = sorted(c.strip().strip('"') for c in grouped.split(","))
            if cols == sorted(key):
                return True
    return False


def model_suites(
    models: dict[str, Any] | None = None, config_path: Path = MARTS_CONFIG_FILE
) -> list[ModelSuite]:
    """The suites for the models that exist (`alliance.sqlrunner.discover_models()` by default)."""
    if models is None:
        from alliance.sqlrunner import discover_models

        models = discover_models()
    raw = yamlio.safe_load(config_path.read_text()) or {}
    rates_cfg = raw.get("rates") or {}
    rate_schemas = set(rates_cfg.get("schemas") or [])
    try:
        ranges = tuple((str(r["column_pattern"]), float(r["min"]), float(r["max"]))
                       for r in rates_cfg.get("ranges") or [])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: rates.ranges entries need column_pattern, min, max ({e})") from e
    configured = raw.get("models") or {}
    suites = []
    for fqn, model in sorted(models.items()):
        schema, name = fqn.split(".", 1)
        cfg = configured.get(f"{schema}/{name}") or {}
        if not isinstance(cfg, dict):
            raise ValueError(f"{config_path}: models.{schema}/{name} must be a mapping")
        raw_totals = cfg.get("totals") or ()
        fixed = tuple(raw_totals.items()) if isinstance(raw_totals, dict) else ()
        totals = tuple(raw_totals)
        key = tuple(cfg.get("key") or ())
        if key and _sidecar_tests_key(model, key):
            key = ()
        rates = ranges if schema in rate_schemas else ()
        documented = [c.name for c in getattr(model, "columns", ())]
        if documented and not any(re.search(p, c) for p, _, _ in rates for c in documented):
            rates = ()  # the sidecar lists every column and none is a rate
        checks = tuple(c for c, on in ((TOTALS_CHECK, totals), (RATES_CHECK, rates),
                                       (KEY_CHECK, key)) if on)
        if checks:
            suites.append(ModelSuite(schema, name, totals, key, tuple(cfg.get("failing_keys") or ()),
                                     rates, tuple((str(k), str(v)) for k, v in fixed), checks))
    return suites


@lru_cache(maxsize=1)
def default_model_suites() -> tuple[ModelSuite, ...]:
    """model_suites() for the repository's models (read once per process)."""
    return tuple(model_suites())


def _columns(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> list[str]:
    return [r[0] for r in con.execute(
        "select column_name from duckdb_columns() where schema_name = ? and table_name = ?"
        " order by column_index", [schema, table]).fetchall()]


def _q(ident: str) -> str:
    return '"' + ident.replace('"', '""') + '"'


def validate_model(con: duckdb.DuckDBPyConnection, suite: ModelSuite) -> dict[str, CheckOutcome]:
    """Run the suite of one model; every check of `suite.checks` gets an outcome."""
    cols = _columns(con, suite.schema, suite.name)
    notes: dict[str, str] = {}
    if not cols:
        return {c: CheckOutcome(c, False, 0, [f"table {suite.table} not found"], [], 0,
                                errors=[f"table {suite.table} not found"]) for c in suite.checks}
    key_cols = [c for c in (suite.failing_keys or PSEUDONYM_COLUMNS) if c in cols]
    specs: list[ExpectationSpec] = []
    select = [*key_cols]
    joins = ""

    totals = [t for t in suite.totals if t in cols]
    missing = [t for t in suite.totals if t not in cols]
    if missing:
        notes[TOTALS_CHECK] = f"columns not in {suite.table}: {missing}"
    has_ranges = bool(_columns(con, "seeds", "instruments"))
    fixed = dict(suite.total_instruments)
    row_instrument = "instrument" in cols
    if totals and has_ranges:
        if row_instrument and "instrument_version" in cols:
            joins = ("left join seeds.instruments as r on r.instrument = m.instrument"
                     " and r.instrument_version = m.instrument_version::varchar")
        elif row_instrument:
            joins = ("left join (select instrument, min(total_min) as total_min,"
                     " max(total_max) as total_max from seeds.instruments group by all) as r"
                     " on r.instrument = m.instrument")
        for t in totals:
            code = fixed.get(t)
            if code is not None and code.startswith("@"):
                # the instrument is named per row by another column (e.g. alliance_total's
                # alliance_instrument: SRS or WAI-SR)
                ref = f"m.{_q(code[1:])}"
                lo = f"(select min(total_min) from seeds.instruments as i where i.instrument = {ref})"
                hi = f"(select max(total_max) from seeds.instruments as i where i.instrument = {ref})"
            elif code is not None:
                lit = "'" + code.replace("'", "''") + "'"
                lo = f"(select min(total_min) from seeds.instruments where instrument = {lit})"
                hi = f"(select max(total_max) from seeds.instruments where instrument = {lit})"
            elif row_instrument:
                lo, hi = "r.total_min", "r.total_max"
            else:
                notes[TOTALS_CHECK] = f"{suite.table}.{t}: no instrument column and none configured"
                continue
            select += [f"{lo} as {_q(t + '__min')}", f"{hi} as {_q(t + '__max')}", _q(t)]
            specs.append(ExpectationSpec(TOTALS_CHECK, "ExpectColumnPairValuesAToBeGreaterThanB",
                                         {"column_A": t, "column_B": f"{t}__min", "or_equal": True,
                                          "ignore_row_if": "either_value_is_missing"}))
            specs.append(ExpectationSpec(TOTALS_CHECK, "ExpectColumnPairValuesAToBeGreaterThanB",
                                         {"column_A": f"{t}__max", "column_B": t, "or_equal": True,
                                          "ignore_row_if": "either_value_is_missing"}))
    elif suite.totals:
        notes[TOTALS_CHECK] = "seeds.instruments not found: totals not checked"

    if suite.rate_ranges:
        found = []
        for pattern, lo, hi in suite.rate_ranges:
            for c in cols:
                if re.search(pattern, c) and c not in found:
                    found.append(c)
                    select.append(_q(c))
                    specs.append(ExpectationSpec(RATES_CHECK, "ExpectColumnValuesToBeBetween",
                                                 {"column": c, "min_value": lo, "max_value": hi}))
        if not found:
            notes[RATES_CHECK] = f"no rate column in {suite.table}"

    if suite.key:
        key = [k for k in suite.key if k in cols]
        if len(key) == len(suite.key):
            select += [_q(k) for k in key if k not in key_cols]
            spec = ("ExpectColumnValuesToBeUnique", {"column": key[0]}) if len(key) == 1 else (
                "ExpectCompoundColumnsToBeUnique", {"column_list": key})
            specs.append(ExpectationSpec(KEY_CHECK, spec[0], spec[1]))
        else:
            notes[KEY_CHECK] = f"key columns not in {suite.table}: {sorted(set(suite.key) - set(key))}"

    result: SuiteResult | None = None
    if specs:
        select_sql = ", ".join(c if " as " in c else f"m.{c}" for c in dict.fromkeys(select))
        df = con.execute(f"select {select_sql} from {suite.schema}.{_q(suite.name)} as m {joins}").df()
        result = validate_frame(df, f"{suite.schema}_{suite.name}", specs, key_cols)
    out = result.checks(suite.checks) if result else {
        c: CheckOutcome(c, True, 0, [], [], 0) for c in suite.checks}
    for o in out.values():
        o.suite_result = result
    for c, note in notes.items():
        if c in out:
            out[c].errors.append(note)
    return out
