"""The dbt-like SQL runner: discover, order, build, document and test the `dbt_like_sql` models.

Each `dbt_like_sql/<schema>/<name>.sql` file holds one `select`; it becomes the table or view
`<schema>.<name>`. Its upstream tables are found by parsing the SQL with sqlglot (CTE names
excluded), never declared by hand. An optional `<name>.yml` sidecar documents the model and its
columns and declares column tests:

    description: One row per session.
    materialized: table            # or view; default: view in staging, table elsewhere
    key: session_id                # column shown as "failing keys" (default: first unique column)
    columns:
      - name: session_id
        description: Session pseudonym.
        data_type: varchar         # optional, shown in Dagster before the first build
        tests:
          - unique
          - not_null
          - accepted_values: {values: [a, b]}
          - relationships: {to: core.episodes, field: episode_id}
          - expression: "total between 0 and 40"
          - {not_null: {severity: warn}}
        severity: error            # default for this column's tests (error | warn)
    tests:                         # model-level tests
      - unique_combination: [session_id, instrument]

No Dagster imports here: the benchmark's plain-DuckDB baseline and the tests use `run_models`.
"""

from __future__ import annotations

import graphlib
import hashlib
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import sqlglot
import yaml
from sqlglot import exp

from alliance import yamlio
from alliance.config import SQL_DIR

log = logging.getLogger(__name__)

DEFAULT_MATERIALIZED = {"staging": "view"}  # any other schema: table
SEVERITIES = ("error", "warn")
MAX_SAMPLE_KEYS = 5
# Keys an incremental model may declare: the runner knows how to find, from new events, every
# key whose rows may change (affected_keys).
KEY_KINDS = ("episode_id", "response_id")
STATE_TABLE = "meta.model_state"
# Time zone of every model build (docs/sql-models.md) and of the reports that read the marts.
MODEL_TIME_ZONE = "UTC"
# Keys a column entry of a sidecar may have.
COLUMN_KEYS = frozenset({"name", "description", "data_type", "tests", "severity"})
KEYS_TABLE = "meta.incremental_keys"


class ModelError(Exception):
    """A model that cannot be parsed, built or documented; the message names file and line."""

    def __init__(self, path: Path | str, message: str, line: int | None = None) -> None:
        self.path = Path(path)
        self.line = line
        where = f"{self.path}:{line}" if line else str(self.path)
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class ColumnDoc:
    """A documented column from the sidecar."""

    name: str
    description: str = ""
    data_type: str = ""


@dataclass(frozen=True)
class ColumnTest:
    """One data test on a model; compiled to SQL that selects the failing rows' keys."""

    model: str  # schema.name
    check_name: str  # `<column>__<test>`, unique per model
    test: str  # unique | not_null | accepted_values | relationships | expression | unique_combination
    column: str | None
    severity: str  # error | warn
    description: str
    failing_sql: str  # select <key> as failing_key from ... (the failing rows)
    key: str | None = field(default=None, compare=False)
    arg: Any = field(default=None, compare=False, repr=False)

    def scoped_sql(self, rows: str) -> str:
        """The test over only the rows in relation `rows` (the rows an incremental build rebuilt).

        Row-level tests read only those rows; `unique` and `unique_combination` count, over the
        whole model, the values that occur among them (a rebuilt row duplicating an old one fails).
        """
        return _compile_test(self.model, self.key, self.column, self.test, self.arg, rows=rows)

    def count_sql(self, failing_sql: str | None = None) -> str:
        """SQL returning (failing row count, up to 5 failing keys as varchar)."""
        return (
            f"with failing as ({failing_sql or self.failing_sql})\n"
            "select (select count(*) from failing) as n_failing,\n"
            "       (select list(k) from (select distinct cast(failing_key as varchar) as k\n"
            f"        from failing where failing_key is not null order by k limit {MAX_SAMPLE_KEYS}))"
            " as sample_keys"
        )


@dataclass(frozen=True)
class TestResult:
    """The outcome of one ColumnTest against the warehouse."""

    test: ColumnTest
    failing: int
    sample_keys: list[str]
    error: str | None = None  # the test SQL itself failed (e.g. missing relationship table)

    @property
    def passed(self) -> bool:
        return self.error is None and self.failing == 0


@dataclass(frozen=True)
class Model:
    """One SQL model: file, sidecar, upstream tables and tests."""

    schema: str
    name: str
    path: Path
    sql: str
    description: str = ""
    materialized: str = "table"
    key: str | None = None
    columns: tuple[ColumnDoc, ...] = ()
    tests: tuple[ColumnTest, ...] = ()
    deps: tuple[tuple[str, str], ...] = ()
    sidecar_path: Path | None = None
    # `incremental: {key: episode_id}` in the sidecar: rebuild only the rows of the keys that new
    # events touch (see "Incremental builds" below); None: every build is a full one.
    incremental_key: str | None = None
    # A model that cannot be parsed still appears (so one broken file does not hide the others);
    # building it raises this error.
    error: ModelError | None = field(default=None, compare=False)

    @property
    def fqn(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def key_path(self) -> tuple[str, str]:
        return (self.schema, self.name)

    @property
    def code_version(self) -> str:
        """A hash of the SQL and sidecar, so Dagster can tell when a model's code changed."""
        h = hashlib.sha256(self.sql.encode())
        if self.sidecar_path and self.sidecar_path.exists():
            h.update(self.sidecar_path.read_bytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class BuildPlan:
    """How a model is built this time: fully, or only the keys touched by new events."""

    mode: str  # full | incremental
    reason: str  # why (e.g. "code changed", "upstream core.sessions fully refreshed")
    since_file_id: int | None = None  # incremental: events with since < file_id <= through are new
    through_file_id: int | None = None  # max(raw.events.file_id) when the build started


@dataclass(frozen=True)
class BuildResult:
    """What building one model produced."""

    model: Model
    row_count: int
    columns: list[tuple[str, str]]  # (name, duckdb type)
    seconds: float
    warnings: list[str] = field(default_factory=list)
    mode: str = "full"  # full | incremental
    reason: str = ""
    keys_rebuilt: int | None = None  # incremental: how many keys were deleted and rebuilt
    rows_rebuilt: int | None = None  # incremental: rows inserted for them
    # incremental: a temp relation holding the rebuilt rows (tests run over it); None: whole model
    test_scope: str | None = None


# ---------------------------------------------------------------- parsing


def clean_sql(sql: str) -> str:
    """The model's select without trailing whitespace and semicolons (it is embedded in DDL)."""
    return sql.rstrip().rstrip(";").rstrip()


def parse_deps(sql: str, path: Path | str = "<sql>") -> tuple[tuple[str, str], ...]:
    """Upstream tables (schema, name) a select reads, CTE names excluded, in first-seen order.

    Raises ModelError with the file line when sqlglot cannot parse the SQL.
    """
    try:
        statements = sqlglot.parse(sql, read="duckdb")
    except sqlglot.errors.ParseError as e:
        first = e.errors[0] if e.errors else {}
        raise ModelError(
            path,
            f"SQL syntax error: {first.get('description', str(e))} near "
            f"{first.get('highlight', '')!r} (column {first.get('col')})",
            first.get("line"),
        ) from e
    statements = [s for s in statements if s is not None]
    if len(statements) != 1:
        raise ModelError(path, f"a model holds exactly one select; found {len(statements)} statements")
    tree = statements[0]
    cte_names = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
    deps: list[tuple[str, str]] = []
    for table in tree.find_all(exp.Table):
        if not isinstance(table.this, exp.Identifier):
            continue  # table functions: read_parquet(...), range(...)
        schema, name = table.db.lower(), table.name.lower()
        if not schema:
            if name not in cte_names:
                log.warning("%s: unqualified table %r is not a CTE; write schema.table", path, name)
            continue
        if (schema, name) not in deps:
            deps.append((schema, name))
    return tuple(deps)


def _sql_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def _quote(ident: str) -> str:
    return '"' + ident.replace('"', '""') + '"'


def _compile_test(model: str, key: str | None, column: str | None, test: str, arg: Any,
                  rows: str | None = None) -> str:
    """SQL selecting `failing_key` for every row that violates the test.

    With `rows` (a relation holding a subset of the model's rows), row-level tests read only those
    rows and uniqueness is checked, over the whole model, for the values found among them.
    """
    col = _quote(column) if column else None
    key_expr = _quote(key) if key else (col or "null")
    src = rows or model
    if test == "not_null":
        return f"select {key_expr} as failing_key from {src} where {col} is null"
    if test == "unique":
        scope = f" and {col} in (select {col} from {rows})" if rows else ""
        return (f"select {col} as failing_key from {model} where {col} is not null{scope} "
                f"group by {col} having count(*) > 1")
    if test == "accepted_values":
        values = arg.get("values") if isinstance(arg, dict) else arg
        if not isinstance(values, list) or not values:
            raise ValueError("accepted_values needs {values: [...]}")
        listed = ", ".join(_sql_literal(v) for v in values)
        return (f"select {key_expr} as failing_key from {src} "
                f"where {col} is not null and {col} not in ({listed})")
    if test == "relationships":
        if not isinstance(arg, dict) or "to" not in arg or "field" not in arg:
            raise ValueError("relationships needs {to: schema.table, field: column}")
        # NULL foreign keys are allowed: "no parent yet" is not a broken reference.
        return (f"select child.{key_expr} as failing_key from {src} as child "
                f"where child.{col} is not null and not exists (select 1 from {arg['to']} as parent "
                f"where parent.{_quote(arg['field'])} = child.{col})")
    if test == "expression":
        if not isinstance(arg, str) or not arg.strip():
            raise ValueError("expression needs a SQL boolean, e.g. expression: \"total >= 0\"")
        # Like dbt's expression_is_true: a NULL result passes (not_null tests NULLs).
        return f"select {key_expr} as failing_key from {src} where not ({arg})"
    if test == "unique_combination":
        cols = arg.get("columns") if isinstance(arg, dict) else arg
        if not isinstance(cols, list) or not cols:
            raise ValueError("unique_combination needs a list of columns")
        listed = ", ".join(_quote(c) for c in cols)
        scope = ""
        if rows:
            match = " and ".join(f"r.{_quote(c)} is not distinct from m.{_quote(c)}" for c in cols)
            scope = f" as m where exists (select 1 from {rows} as r where {match})"
        return (f"select concat_ws('|', {listed}) as failing_key from {model}{scope} "
                f"group by {listed} having count(*) > 1")
    raise ValueError(
        f"unknown test {test!r} (known: unique, not_null, accepted_values, relationships, "
        "expression, unique_combination)"
    )


def _parse_test(entry: Any) -> tuple[str, Any, str | None]:
    """A sidecar test entry as (test name, argument, severity override)."""
    if isinstance(entry, str):
        return entry, None, None
    if isinstance(entry, dict):
        entry = dict(entry)
        # severity may sit beside the test ({expression: "...", severity: warn}) or inside it
        severity = entry.pop("severity", None)
        if len(entry) == 1:
            (name, arg), = entry.items()
            if isinstance(arg, dict) and "severity" in arg:
                arg = dict(arg)
                severity = arg.pop("severity")
            if isinstance(arg, dict) and name in ("not_null", "unique") and not arg:
                arg = None
            return str(name), arg, severity
    raise ValueError(f"a test is a name or a one-key mapping, got {entry!r}")


def _yaml_line(node: yaml.Node | None, *path: str | int) -> int | None:
    """The 1-based line of a value inside a composed YAML document (for error messages)."""
    for step in path:
        if node is None:
            return None
        if isinstance(node, yaml.MappingNode) and isinstance(step, str):
            node = next((v for k, v in node.value if k.value == step), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int):
            node = node.value[step] if step < len(node.value) else None
        else:
            return None
    return node.start_mark.line + 1 if node is not None else None


def load_model(sql_path: Path) -> Model:
    """Read one model file and its sidecar; problems land in `Model.error`, never raise."""
    schema, name = sql_path.parent.name.lower(), sql_path.stem.lower()
    fqn = f"{schema}.{name}"
    sql = clean_sql(sql_path.read_text(encoding="utf-8"))
    sidecar = sql_path.with_suffix(".yml")
    base = Model(schema=schema, name=name, path=sql_path, sql=sql,
                 materialized=DEFAULT_MATERIALIZED.get(schema, "table"),
                 sidecar_path=sidecar if sidecar.exists() else None)
    try:
        deps = parse_deps(sql, sql_path)
    except ModelError as e:
        return _replace(base, error=e)
    base = _replace(base, deps=deps)
    if not sidecar.exists():
        return base

    text = sidecar.read_text(encoding="utf-8")
    try:
        doc = yamlio.safe_load(text) or {}
        node = yamlio.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        return _replace(base, error=ModelError(sidecar, f"invalid YAML: {e}",
                                               mark.line + 1 if mark else None))
    if not isinstance(doc, dict):
        return _replace(base, error=ModelError(sidecar, "the sidecar must be a mapping", 1))

    materialized = str(doc.get("materialized", base.materialized)).lower()
    if materialized not in ("table", "view"):
        return _replace(base, error=ModelError(
            sidecar, f"materialized must be table or view, got {materialized!r}",
            _yaml_line(node, "materialized")))

    columns: list[ColumnDoc] = []
    raw_tests: list[tuple[str | None, Any, str, int | None]] = []
    for i, col in enumerate(doc.get("columns") or []):
        if not isinstance(col, dict) or not col.get("name"):
            return _replace(base, error=ModelError(sidecar, "each column needs a name",
                                                   _yaml_line(node, "columns", i)))
        unknown = sorted(str(k) for k in set(col) - COLUMN_KEYS)
        if unknown:
            # e.g. an unquoted description with a comma in a {...} entry: YAML reads the text
            # after the comma as another key and the description comes out cut short
            return _replace(base, error=ModelError(
                sidecar, f"column {col['name']!r}: unknown key(s) {unknown} (known: "
                f"{', '.join(sorted(COLUMN_KEYS))}; quote a description that holds a comma)",
                _yaml_line(node, "columns", i)))
        columns.append(ColumnDoc(str(col["name"]), str(col.get("description") or "").strip(),
                                 str(col.get("data_type") or "")))
        severity = str(col.get("severity", "error")).lower()
        for j, t in enumerate(col.get("tests") or []):
            raw_tests.append((str(col["name"]), t, severity,
                              _yaml_line(node, "columns", i, "tests", j)))
    for j, t in enumerate(doc.get("tests") or []):
        raw_tests.append((None, t, "error", _yaml_line(node, "tests", j)))

    incremental_key = None
    inc = doc.get("incremental")
    if inc is not None:
        ikey = inc.get("key") if isinstance(inc, dict) else None
        if isinstance(ikey, list) and len(ikey) == 1:
            ikey = ikey[0]
        if ikey not in KEY_KINDS:
            return _replace(base, error=ModelError(
                sidecar, f"incremental needs {{key: <one of {list(KEY_KINDS)}>}}, got {inc!r}",
                _yaml_line(node, "incremental")))
        if columns and ikey not in {c.name for c in columns}:
            return _replace(base, error=ModelError(
                sidecar, f"incremental key {ikey!r} is not a documented column",
                _yaml_line(node, "incremental")))
        incremental_key = str(ikey)

    key = doc.get("key")
    if key is None:
        key = next((c for c, t, _, _ in raw_tests if t == "unique"), None)
    if key is None and columns:
        key = columns[0].name

    tests: list[ColumnTest] = []
    seen: set[str] = set()
    for column, entry, severity, line in raw_tests:
        try:
            test, arg, sev = _parse_test(entry)
            sev = (sev or severity).lower()
            if sev not in SEVERITIES:
                raise ValueError(f"severity must be error or warn, got {sev!r}")
            if test == "unique_combination":
                cols = arg.get("columns") if isinstance(arg, dict) else arg
                check_name = "__".join([*(cols or []), "unique_combination"])
            else:
                if column is None:
                    raise ValueError(f"{test} is a column test; put it under a column")
                check_name = f"{column}__{test}"
            check_name = re.sub(r"[^A-Za-z0-9_]", "_", check_name)
            base_name, n = check_name, 2
            while check_name in seen:  # two expressions on one column
                check_name = f"{base_name}_{n}"
                n += 1
            seen.add(check_name)
            failing_sql = _compile_test(fqn, key, column, test, arg)
        except ValueError as e:
            return _replace(base, error=ModelError(sidecar, f"test {entry!r}: {e}", line))
        tests.append(ColumnTest(model=fqn, check_name=check_name, test=test, column=column,
                                severity=sev, description=_describe_test(test, column, arg),
                                failing_sql=failing_sql, key=key, arg=arg))

    return _replace(base, description=str(doc.get("description") or "").strip(),
                    materialized=materialized, key=key, columns=tuple(columns), tests=tuple(tests),
                    incremental_key=incremental_key)


def _describe_test(test: str, column: str | None, arg: Any) -> str:
    if test == "accepted_values":
        values = arg.get("values") if isinstance(arg, dict) else arg
        return f"{column} is one of {values} (or NULL)"
    if test == "relationships":
        return f"{column} exists in {arg['to']}.{arg['field']} (NULLs ignored)"
    if test == "expression":
        return f"every row satisfies: {arg}"
    if test == "unique_combination":
        return f"no two rows share {arg}"
    return f"{column} is {test.replace('_', ' ')}"


def _replace(model: Model, **changes: Any) -> Model:
    from dataclasses import replace

    return replace(model, **changes)


_DISCOVERED: dict[tuple, dict[str, Model]] = {}


def discover_models(sql_dir: Path | str | None = None) -> dict[str, Model]:
    """Every model under sql_dir (default: the repo's dbt_like_sql/), keyed by `schema.name`.

    Parsed once per process while no `.sql`/`.yml` file changes (size and mtime): loading the
    definitions asks for the models three times (assets, quality checks, job selections), and
    parsing them (sqlglot, YAML) is most of that cost.
    """
    root = (Path(sql_dir) if sql_dir is not None else SQL_DIR).resolve()
    files = sorted(p for p in root.glob("*/*") if p.suffix in (".sql", ".yml"))
    stamp = (str(root), tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files))
    cached = _DISCOVERED.get(stamp)
    if cached is None:
        cached = {}
        for sql_path in sorted(root.glob("*/*.sql")):
            model = load_model(sql_path)
            cached[model.fqn] = model
        _DISCOVERED.clear()
        _DISCOVERED[stamp] = cached
    return dict(cached)  # Model is frozen; the dict is the caller's own


def topological_order(models: dict[str, Model]) -> list[str]:
    """Model names ordered so every model comes after the models it reads."""
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for fqn, model in models.items():
        sorter.add(fqn, *(f"{s}.{n}" for s, n in model.deps if f"{s}.{n}" in models))
    try:
        return list(sorter.static_order())
    except graphlib.CycleError as e:
        cycle = " -> ".join(e.args[1])
        first = models[e.args[1][0]]
        raise ModelError(first.path, f"models read each other in a cycle: {cycle}") from e


# ---------------------------------------------------------------- building


def set_as_of(con: duckdb.DuckDBPyConnection, as_of: str | None) -> None:
    """Make this connection's staging views show only events recorded by `as_of` (None: all)."""
    if as_of is None:
        con.execute("reset variable as_of")
        return
    try:
        # validate first: the value is spliced into SET VARIABLE, which takes no parameters
        con.execute("select ?::timestamptz", [as_of]).fetchone()
    except duckdb.Error as e:
        raise ValueError(f"as_of {as_of!r} is not a timestamp (e.g. 2026-02-01T00:00:00+00:00)") from e
    con.execute(f"set variable as_of = {_sql_literal(as_of)}")


_LINE_RE = re.compile(r"LINE (\d+):")


def _duckdb_error(model: Model, e: duckdb.Error) -> ModelError:
    # The DDL prefix is put on the SQL's first line, so DuckDB's LINE n is the file's line n
    # (plus any leading lines the cleaner removed: none, we only strip the end).
    msg = str(e)
    m = _LINE_RE.search(msg)
    first = msg.split("\n\nLINE")[0].strip()
    return ModelError(model.path, first, int(m.group(1)) if m else None)


def _existing_kind(con: duckdb.DuckDBPyConnection, schema: str, name: str) -> str | None:
    row = con.execute(
        "select 'view' from duckdb_views() where schema_name = ? and view_name = ? "
        "and database_name = current_database() "
        "union all select 'table' from duckdb_tables() where schema_name = ? and table_name = ? "
        "and database_name = current_database()",
        [schema, name, schema, name],
    ).fetchone()
    return row[0] if row else None


def _comment(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def build_model(con: duckdb.DuckDBPyConnection, model: Model, *,
                strict_columns: bool = True, incremental: bool = False) -> BuildResult:
    """Create or replace one model's table or view, with comments, in one transaction.

    Idempotent: re-running gives the same object. Raises ModelError naming the file and line
    when the SQL is broken, or when the sidecar documents a column the model does not produce.
    Undocumented model columns only warn.

    With incremental=True a table model whose sidecar declares `incremental: {key: ...}` rebuilds
    only the rows of the keys that events ingested since its last build touch, unless its state
    (meta.model_state) calls for a full refresh (`plan_build`). The state row is written in the
    same transaction as the model, so a crash never leaves them out of step.
    """
    if model.error is not None:
        raise model.error
    # Months, dates and day boundaries of timestamptz values are UTC's, whatever the host's TZ
    # (DuckDB takes its TimeZone from it: a build in Auckland put late-evening UTC events in the
    # next month).
    con.execute(f"set TimeZone = '{MODEL_TIME_ZONE}'")
    started = time.perf_counter()
    kind = model.materialized
    target = f"{_quote(model.schema)}.{_quote(model.name)}"
    warnings: list[str] = []
    keys_rebuilt = rows_rebuilt = None
    scope: str | None = None
    con.execute("begin transaction")
    try:
        _ensure_meta(con)
        plan, code_hash, in_hash = plan_build(con, model, incremental=incremental)
        con.execute(f"create schema if not exists {_quote(model.schema)}")
        existing = _existing_kind(con, model.schema, model.name)
        if plan.mode == "incremental" and kind == "table":
            keys = affected_keys(con, model.incremental_key, plan.since_file_id,
                                 plan.through_file_id)
            k = _quote(model.incremental_key)
            keys_rebuilt = con.execute(f"select count(*) from {keys}").fetchone()[0]
            con.execute(f"delete from {target} where {k} in (select {k} from {keys})")
            restricted = restrict_sql(con, model, plan.since_file_id, plan.through_file_id)
            try:
                rows_rebuilt = con.execute(
                    f"insert into {target} select * from ({restricted}) as _model "
                    f"where {k} in (select {k} from {keys})").fetchone()[0]
            except duckdb.Error as e:
                raise ModelError(model.path, f"incremental build failed: {str(e).splitlines()[0]}"
                                 ) from e
        else:
            if existing and existing != kind:  # switching table <-> view
                con.execute(f"drop {existing} {target}")
            try:
                # No newline after `as`: DuckDB's "LINE n" then equals the line in the .sql file.
                con.execute(f"create or replace {kind} {target} as {model.sql}")
            except duckdb.Error as e:
                raise _duckdb_error(model, e) from e
        actual = con.execute(
            "select column_name, data_type from duckdb_columns() where schema_name = ? and "
            "table_name = ? and database_name = current_database() order by column_index",
            [model.schema, model.name],
        ).fetchall()
        actual_names = [c for c, _ in actual]
        missing = [c.name for c in model.columns if c.name not in actual_names]
        if missing and strict_columns:
            raise ModelError(model.sidecar_path or model.path,
                             f"sidecar documents columns the model does not produce: {missing}; "
                             f"the model has {actual_names}")
        undocumented = [c for c in actual_names if c not in {d.name for d in model.columns}]
        if model.sidecar_path is None:
            warnings.append(f"{model.fqn}: no sidecar {model.path.with_suffix('.yml').name}; "
                            "the model and its columns are undocumented and untested")
        elif undocumented:
            warnings.append(f"{model.fqn}: columns without a description in "
                            f"{model.sidecar_path.name}: {undocumented}")
        types = dict(actual)
        for col in model.columns:
            declared = col.data_type.lower()
            if declared and col.name in types and declared != types[col.name].lower():
                warnings.append(f"{model.sidecar_path}: column {col.name} is declared "
                                f"{col.data_type} but the model gives {types[col.name]}")
        if plan.mode == "full":  # an incremental build keeps the table and its comments
            if model.description:
                con.execute(f"comment on {kind} {target} is {_comment(model.description)}")
            for col in model.columns:
                if col.description and col.name in actual_names:
                    con.execute(f"comment on column {target}.{_quote(col.name)} is "
                                f"{_comment(col.description)}")
        if plan.mode == "incremental" and model.incremental_key:
            # the rows the tests re-check: for a view, the keys touched since its last tests
            keys = affected_keys(con, model.incremental_key, plan.since_file_id,
                                 plan.through_file_id)
            scope = f"_scope_{model.schema}_{model.name}"
            k = _quote(model.incremental_key)
            con.execute(f"create or replace temp table {_quote(scope)} as select * from {target} "
                        f"where {k} in (select {k} from {keys})")
            scope = _quote(scope)
        _write_state(con, model, plan, code_hash, in_hash)
        con.execute("commit")
    except BaseException:
        con.execute("rollback")
        raise
    for w in warnings:
        log.warning(w)
    row_count = con.execute(f"select count(*) from {target}").fetchone()[0]
    return BuildResult(model=model, row_count=int(row_count), columns=list(actual),
                       seconds=time.perf_counter() - started, warnings=warnings,
                       mode=plan.mode, reason=plan.reason, keys_rebuilt=keys_rebuilt,
                       rows_rebuilt=rows_rebuilt, test_scope=scope)


# ---------------------------------------------------------------- incremental builds
#
# State: one row per model in meta.model_state (code hash of SQL + sidecar, hash of the seed
# tables it reads, the raw.events file_id it is built through, and two sequence numbers: when it
# was last built and when it was last rebuilt fully). A model builds incrementally only when
# nothing says otherwise (plan_build); it then deletes and re-inserts the rows of the keys that
# events with file_id > its watermark touch (affected_keys), computing them from its upstream
# tables restricted to those keys (restrict_sql): DuckDB does not push a key filter on a model's
# output down through its windows and aggregates, so the inputs are restricted instead.


def _ensure_meta(con: duckdb.DuckDBPyConnection) -> None:
    from alliance.catalog import ensure_table
    from alliance.rejections import ensure_rejections_table

    ensure_rejections_table(con)  # staging.stg_events reads it, even before any ingest
    for table, columns in ((STATE_TABLE, """model varchar primary key, materialized varchar,
            code_hash varchar, inputs_hash varchar, built_through_file_id bigint, built_seq bigint,
            full_seq bigint, built_at timestamptz, last_mode varchar, last_reason varchar"""),
                           (KEYS_TABLE, """kind varchar, since_file_id bigint,
            through_file_id bigint, key varchar""")):
        doc, cols = META_COMMENTS[table]
        schema, name = table.split(".")
        ensure_table(con, schema, name, f"create schema if not exists {schema}; "
                     f"create table if not exists {table} ({columns}); "
                     f"comment on table {table} is {_comment(doc)}; " + "; ".join(
                         f"comment on column {table}.{c} is {_comment(t)}" for c, t in cols.items()))


META_COMMENTS: dict[str, tuple[str, dict[str, str]]] = {
    STATE_TABLE: ("The SQL runner's build state: one row per model (docs/sql-models.md). A changed "
                  "model or seed triggers a full rebuild; otherwise new files are built incrementally.", {
        "model": "Model as schema.name.",
        "materialized": "table or view.",
        "code_hash": "Hash of the model's SQL and sidecar when it was last built.",
        "inputs_hash": "Hash of the seeds and parameters it read.",
        "built_through_file_id": "Highest raw.ingested_files.file_id included in the last build.",
        "built_seq": "Build counter of the last build.",
        "full_seq": "Build counter of the last full build.",
        "built_at": "When it was last built.",
        "last_mode": "full or incremental.",
        "last_reason": "Why the last build was full or incremental."}),
    KEYS_TABLE: ("Keys (episode or response ids, pseudonymised) touched by the files of an "
                 "incremental build, computed once and shared by the incremental models.", {
        "kind": "episode_id or response_id.",
        "since_file_id": "Files after this one are new in the build.",
        "through_file_id": "Last file of the build.",
        "key": "The key (a pseudonym or event_id); NULL marks a computed, empty set."}),
}


def _table_exists(con: duckdb.DuckDBPyConnection, schema: str, name: str) -> bool:
    return _existing_kind(con, schema, name) is not None


def _current_file_id(con: duckdb.DuckDBPyConnection) -> int | None:
    """max(raw.events.file_id): what a build now covers (None without an event log)."""
    if not _table_exists(con, "raw", "events"):
        return None
    return int(con.execute("select coalesce(max(file_id), 0) from raw.events").fetchone()[0])


def inputs_hash(con: duckdb.DuckDBPyConnection, model: Model) -> str:
    """A hash of the content of the seed tables the model reads (parameters, instruments)."""
    h = hashlib.sha256()
    # A rejected file takes its events out of every model (staging.stg_events): with rejections
    # in the hash, the next build after one is a full rebuild. Nothing is added while there are
    # none, so the hashes of warehouses without rejections stay as they were.
    if _table_exists(con, "raw", "rejected_files"):
        rej = con.execute("select string_agg(file_id::varchar, ',' order by file_id) "
                          "from raw.rejected_files").fetchone()[0]
        if rej:
            h.update(f"rejected:{rej};".encode())
    for schema, name in model.deps:
        if schema != "seeds" or not _table_exists(con, schema, name):
            continue
        t = f"{_quote(schema)}.{_quote(name)}"
        row = con.execute(f"select count(*), md5(coalesce(string_agg(md5(cast(s as varchar)), '' "
                          f"order by md5(cast(s as varchar))), '')) from {t} as s").fetchone()
        h.update(f"{schema}.{name}:{row[0]}:{row[1]};".encode())
    return h.hexdigest()[:16]


def read_state(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, Any]]:
    """Every model's build state (meta.model_state) keyed by `schema.name`; {} without one."""
    if not _table_exists(con, "meta", "model_state"):
        return {}
    cur = con.execute(f"select * from {STATE_TABLE}")
    names = [d[0] for d in cur.description]
    return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}


def plan_build(con: duckdb.DuckDBPyConnection, model: Model, *,
               incremental: bool = True) -> tuple[BuildPlan, str, str]:
    """Decide full or incremental for one model: (plan, code hash, inputs hash).

    Full refresh when the run asks for it, the model declares no incremental key, the as-of
    variable is set, there is no event log or no state, the SQL or sidecar changed, a seed table
    it reads changed (or a file was rejected: alliance.rejections), an upstream model has no
    state or was fully rebuilt after this model's last build, or the model's table is missing. Views are always recreated (it costs nothing); for
    them "incremental" only narrows which rows their tests re-check. The watermark recorded
    (`through`) is the event log's newest file, capped at the watermark of every upstream model.
    """
    code_hash = model.code_version
    in_hash = inputs_hash(con, model)
    through = _current_file_id(con)
    state = read_state(con)
    if through is not None:
        # A model is only as current as what it reads: an upstream model built through an
        # earlier file (a subset run built this model alone, or the ingest ran without the
        # models) caps the watermark recorded here, so the files in between are rebuilt into
        # this model once the upstream has them. Recording the log's newest file instead made
        # a later incremental build skip them for good.
        for schema, name in model.deps:
            up = state.get(f"{schema}.{name}")
            if schema not in ("raw", "seeds") and up and up["built_through_file_id"] is not None:
                through = min(through, int(up["built_through_file_id"]))

    def full(reason: str) -> tuple[BuildPlan, str, str]:
        return BuildPlan("full", reason, None, through), code_hash, in_hash

    if not incremental:
        return full("full refresh requested")
    if model.incremental_key is None:
        return full("no incremental key declared")
    if through is None:
        return full("no raw.events")
    if con.execute("select getvariable('as_of') is not null").fetchone()[0]:
        return full("as-of build")
    mine = state.get(model.fqn)
    if mine is None:
        return full("no build state")
    if mine["built_through_file_id"] is None:
        return full("last build covered no watermark")
    if mine["code_hash"] != code_hash:
        return full("SQL or sidecar changed")
    if mine["inputs_hash"] != in_hash:
        return full("seed tables or parameters changed")
    if mine["materialized"] != model.materialized or not _table_exists(con, model.schema,
                                                                       model.name):
        return full("model object missing or materialisation changed")
    for schema, name in model.deps:
        if schema in ("raw", "seeds"):
            continue
        up = state.get(f"{schema}.{name}")
        if up is None:
            return full(f"upstream {schema}.{name} has no build state")
        if up["full_seq"] is not None and up["full_seq"] > mine["built_seq"]:
            return full(f"upstream {schema}.{name} was fully rebuilt since")
    since = int(mine["built_through_file_id"])
    if since > through:
        return full("event log or an upstream model is behind the model's watermark")
    return BuildPlan("incremental", f"events with file_id {since} < id <= {through}", since,
                     through), code_hash, in_hash


def invalidate_state(con: duckdb.DuckDBPyConnection, model: Model) -> None:
    """Forget a model's build state, so that its next build is a full one (and tests every row).

    Called when a blocking test fails after a build: the state was written with the build, and an
    incremental next run would rebuild and re-test only the keys of new events, leaving the rows
    that failed untested, and publishable, from then on.
    """
    if _table_exists(con, "meta", "model_state"):
        con.execute(f"delete from {STATE_TABLE} where model = ?", [model.fqn])


def _write_state(con: duckdb.DuckDBPyConnection, model: Model, plan: BuildPlan,
                 code_hash: str, in_hash: str) -> None:
    prev = con.execute(f"select code_hash, inputs_hash, full_seq from {STATE_TABLE} where model = ?",
                       [model.fqn]).fetchone()
    seq = time.time_ns()
    full_seq = prev[2] if prev else None
    # A full table rebuild may change any row: downstream incremental models must then rebuild
    # fully too. A view is always current; it counts as refreshed only when its definition changed.
    if model.materialized == "table":
        if plan.mode == "full":
            full_seq = seq
    elif prev is None or prev[0] != code_hash or prev[1] != in_hash:
        full_seq = seq
    as_of = con.execute("select getvariable('as_of') is not null").fetchone()[0]
    through = None if as_of else plan.through_file_id  # as-of builds never seed an incremental one
    con.execute(f"insert or replace into {STATE_TABLE} values (?, ?, ?, ?, ?, ?, ?, now(), ?, ?)",
                [model.fqn, model.materialized, code_hash, in_hash, through, seq, full_seq,
                 plan.mode, plan.reason])


_NEW_EVENTS_SQL = """
create or replace temp table _inc_new as
select event_id, event_type, episode_id, session_id, payload
from raw.events where file_id > {since} and file_id <= {through}
"""

# Amendment links (both directions) among questionnaire events, to follow correction chains
# across episodes (an amendment may name another episode than the submission it corrects).
_EDGES_SQL = """
create or replace temp table _inc_edges as
with links as (
    select event_id as a, payload ->> 'amends_event_id' as b
    from raw.events
    where event_type = 'questionnaire.amended' and file_id <= {through}
)
select a, b from links where b is not null
union all
select b, a from links where b is not null
"""

_SEED_EPISODES_SQL = """
create or replace temp table _inc_episodes as
select episode_id from _inc_new where episode_id is not null
union
-- a retraction names no episode: take the retracted event's, and for an orphan response (its
-- submission never arrived, so the retraction names an id no event has) the episodes of the
-- amendments that amend that id
select events.episode_id
from raw.events as events
where events.file_id <= {through} and events.episode_id is not null
    and (events.event_id in (
            select payload ->> 'retracts_event_id' from _inc_new
            where event_type = 'questionnaire.retracted')
         or (events.event_type = 'questionnaire.amended'
             and (events.payload ->> 'amends_event_id') in (
                select payload ->> 'retracts_event_id' from _inc_new
                where event_type = 'questionnaire.retracted')))
"""

# One step of the closure: episodes sharing a session with an affected episode, and episodes of
# events chained (amendments) to a questionnaire event of an affected episode.
_CLOSE_EPISODES_SQL = """
insert into _inc_episodes
with recursive
events as (
    select event_id, event_type, episode_id, session_id from raw.events where file_id <= {through}
),
affected_events as (
    select * from events where episode_id in (select episode_id from _inc_episodes)
),
sessions as (
    select distinct session_id from affected_events where session_id is not null
),
walk(event_id) as (
    select event_id from affected_events
    where event_type in ('questionnaire.submitted', 'questionnaire.amended')
        and event_id in (select a from _inc_edges)
    union
    select _inc_edges.b from _inc_edges inner join walk on _inc_edges.a = walk.event_id
)
select distinct episode_id
from events
where episode_id is not null
    and episode_id not in (select episode_id from _inc_episodes)
    and (session_id in (select session_id from sessions)
         or event_id in (select event_id from walk))
"""


# A response's id is its submission's event_id; for an orphan chain (its submission has not
# arrived) it is the amends_event_id at the chain's root (staging.stg_questionnaire_versions).
# Every amends_event_id of the affected episodes is taken, not only roots: a superset costs a few
# unused keys and needs no second definition of "root" (as-of, rejected files) to stay in step.
_RESPONSE_KEYS_SQL = """
insert into {keys}
with
events as (
    select event_id, event_type, payload ->> 'amends_event_id' as amends_event_id
    from raw.events
    where file_id <= {through}
        and event_type in ('questionnaire.submitted', 'questionnaire.amended')
        and episode_id in (select episode_id from _inc_episodes)
),
response_ids as (
    select event_id as response_id from events where event_type = 'questionnaire.submitted'
    union
    select amends_event_id from events where event_type = 'questionnaire.amended'
)
select 'response_id', {since}, {through}, response_id from response_ids
where response_id is not null
"""


def affected_keys(con: duckdb.DuckDBPyConnection, kind: str | None, since: int | None,
                  through: int | None) -> str:
    """A temp table (column `kind`) of every key whose rows events since..through may change.

    episode_id: the episodes named by the new events, of the events a new retraction retracts,
    closed under "shares a session with" and "is in the same amendment chain as" (so a session
    or a questionnaire response never straddles the affected and unaffected episodes).
    response_id: every questionnaire submission of those episodes and every id their amendments
    name (a response's id is its submission's event_id, or for an orphan chain the missing
    submission's id its root amendment names; its whole chain lies in affected episodes by the
    closure).
    Computed once per (since, through) and kept in meta.incremental_keys for the other models.
    """
    if kind not in KEY_KINDS or since is None or through is None:
        raise ValueError(f"cannot compute affected keys for {kind!r} ({since}..{through})")
    temp = f"_inc_keys_{kind}"
    cached = con.execute(f"select count(*) from {KEYS_TABLE} where kind = ? and since_file_id = ? "
                         "and through_file_id = ?", [kind, since, through]).fetchone()[0]
    if not cached and since >= through:  # nothing new: nothing touched
        con.execute(f"insert into {KEYS_TABLE} values ('episode_id', ?, ?, null), "
                    "('response_id', ?, ?, null)", [since, through, since, through])
    elif not cached:
        started = time.perf_counter()
        fmt = {"since": int(since), "through": int(through)}
        con.execute(_NEW_EVENTS_SQL.format(**fmt))
        con.execute(_EDGES_SQL.format(**fmt))
        con.execute(_SEED_EPISODES_SQL.format(**fmt))
        for _ in range(20):  # consistent data converges in one or two steps
            added = con.execute(_CLOSE_EPISODES_SQL.format(**fmt)).fetchone()[0]
            if not added:
                break
        # old ranges are of no further use (a model behind them recomputes its own range)
        con.execute(f"delete from {KEYS_TABLE} where through_file_id < ?", [through])
        con.execute(f"insert into {KEYS_TABLE} select 'episode_id', ?, ?, episode_id "
                    "from _inc_episodes", [since, through])
        con.execute(_RESPONSE_KEYS_SQL.format(keys=KEYS_TABLE, **fmt))
        # marker rows: the range is computed even when it touched nothing
        con.execute(f"insert into {KEYS_TABLE} values ('episode_id', ?, ?, null), "
                    "('response_id', ?, ?, null)", [since, through, since, through])
        log.info("affected keys for file_id %s..%s computed in %.2f s", since, through,
                 time.perf_counter() - started)
    con.execute(f"create or replace temp table {temp} as select key as {kind} from {KEYS_TABLE} "
                "where kind = ? and since_file_id = ? and through_file_id = ? and key is not null",
                [kind, since, through])
    return temp


def restrict_sql(con: duckdb.DuckDBPyConnection, model: Model, since: int, through: int) -> str:
    """The model's SQL with each upstream relation restricted to the affected keys.

    An upstream relation with the model's key column is filtered on it; one without it but with
    another key column (episode_id or response_id) on that key's affected set; one with neither
    (seeds, retractions) is read whole. This is exact for a model whose rows of key k are computed
    only from input rows of k: what `incremental: {key: ...}` in a sidecar promises.
    """
    from sqlglot.dialects.duckdb import DuckDB
    from sqlglot.tokens import TokenType

    kind = model.incremental_key
    assert kind is not None
    deps = set(model.deps)
    cols: dict[tuple[str, str], set[str]] = {}
    for schema, name, column in con.execute(
        "select schema_name, table_name, column_name from duckdb_columns() "
        "where database_name = current_database()"
    ).fetchall():
        if (schema, name) in deps:
            cols.setdefault((schema, name), set()).add(column)
    key_sets: dict[str, str] = {}
    tokens = DuckDB().tokenize(model.sql)
    out: list[str] = []
    pos = 0
    for i in range(len(tokens) - 2):
        a, dot, b = tokens[i], tokens[i + 1], tokens[i + 2]
        if (dot.token_type != TokenType.DOT or (i > 0 and tokens[i - 1].token_type == TokenType.DOT)
                or (i + 3 < len(tokens) and tokens[i + 3].token_type == TokenType.DOT)):
            continue
        ref = (a.text.lower(), b.text.lower())
        if ref not in deps:
            continue
        available = cols.get(ref, set())
        column = next((c for c in (kind, *KEY_KINDS) if c in available), None)
        if column is None:
            continue
        if column not in key_sets:
            key_sets[column] = affected_keys(con, column, since, through)
        nxt = tokens[i + 3] if i + 3 < len(tokens) else None
        has_alias = nxt is not None and nxt.token_type in (TokenType.ALIAS, TokenType.VAR)
        c = _quote(column)
        sub = (f"(select * from {a.text}.{b.text} where {c} in "
               f"(select {c} from {key_sets[column]}))")
        out.append(model.sql[pos:a.start])
        out.append(sub if has_alias else f"{sub} as {b.text}")
        pos = b.end + 1
    out.append(model.sql[pos:])
    return "".join(out)


def run_tests(con: duckdb.DuckDBPyConnection, model: Model,
              check_names: Iterable[str] | None = None,
              scope: str | None = None) -> list[TestResult]:
    """Run a model's tests (or the named ones) and return failing counts and sample keys.

    With `scope` (BuildResult.test_scope of an incremental build) each test checks only the
    rebuilt rows (uniqueness: their values, counted over the whole model).
    """
    wanted = set(check_names) if check_names is not None else None
    results: list[TestResult] = []
    for test in model.tests:
        if wanted is not None and test.check_name not in wanted:
            continue
        try:
            sql = test.count_sql(test.scoped_sql(scope) if scope else None)
            n, keys = con.execute(sql).fetchone()
            results.append(TestResult(test, int(n), list(keys or [])))
        except duckdb.Error as e:
            results.append(TestResult(test, -1, [], error=f"{model.sidecar_path}: {test.check_name}: "
                                                            f"{str(e).splitlines()[0]}"))
    return results


def select_models(models: dict[str, Model], select: Sequence[str] | str | None = None,
                  *, upstream: bool = False) -> list[str]:
    """Names of the selected models in build order; names may be `schema.name` or bare `name`.

    With upstream=True the selection grows to every model it reads, transitively.
    """
    order = topological_order(models)
    if select is None:
        return order
    if isinstance(select, str):
        select = [select]
    chosen: set[str] = set()
    for s in select:
        s = s.lower()
        hits = [f for f in models if f == s or f.split(".", 1)[1] == s or f.startswith(s + ".")]
        if not hits:
            raise KeyError(f"no model matches {s!r}; known: {sorted(models)}")
        chosen.update(hits)
    if upstream:
        todo = list(chosen)
        while todo:
            for s, n in models[todo.pop()].deps:
                dep = f"{s}.{n}"
                if dep in models and dep not in chosen:
                    chosen.add(dep)
                    todo.append(dep)
    return [f for f in order if f in chosen]


def run_models(con: duckdb.DuckDBPyConnection, select: Sequence[str] | str | None = None, *,
               sql_dir: Path | str | None = None, upstream: bool = False,
               tests: bool = False, incremental: bool = False) -> list[BuildResult]:
    """Build all models (or a selection) in dependency order, without Dagster.

    With tests=True, every error-severity test failure raises ModelError after its model is built
    (warn-severity failures are logged), mirroring blocking checks in Dagster. With
    incremental=True models build incrementally where their state allows (`plan_build`); the
    tests then check the rebuilt rows only. With the as-of variable set (`set_as_of`), the
    selection's upstream models are rebuilt too: some staging models are tables.
    """
    models = discover_models(sql_dir)
    results: list[BuildResult] = []
    if con.execute("select getvariable('as_of') is not null").fetchone()[0]:
        # Some staging models are tables (built with every event they saw): a selection built
        # under a cutoff rebuilds what it reads too, or it would mix in later events.
        upstream = True
    for fqn in select_models(models, select, upstream=upstream):
        model = models[fqn]
        built = build_model(con, model, incremental=incremental)
        results.append(built)
        if tests:
            for r in run_tests(con, model, scope=built.test_scope):
                if r.passed:
                    continue
                msg = (f"test {r.test.check_name} on {fqn} failed: "
                       f"{r.error or f'{r.failing} rows, e.g. {r.sample_keys}'}")
                if r.test.severity == "error":
                    invalidate_state(con, model)
                    raise ModelError(model.sidecar_path or model.path, msg)
                log.warning(msg)
    return results
