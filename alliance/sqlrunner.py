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

from alliance.config import SQL_DIR

log = logging.getLogger(__name__)

DEFAULT_MATERIALIZED = {"staging": "view"}  # any other schema: table
SEVERITIES = ("error", "warn")
MAX_SAMPLE_KEYS = 5


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

    def count_sql(self) -> str:
        """SQL returning (failing row count, up to 5 failing keys as varchar)."""
        return (
            f"with failing as ({self.failing_sql})\n"
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
class BuildResult:
    """What building one model produced."""

    model: Model
    row_count: int
    columns: list[tuple[str, str]]  # (name, duckdb type)
    seconds: float
    warnings: list[str] = field(default_factory=list)


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


def _compile_test(model: str, key: str | None, column: str | None, test: str, arg: Any) -> str:
    """SQL selecting `failing_key` for every row that violates the test."""
    col = _quote(column) if column else None
    key_expr = _quote(key) if key else (col or "null")
    if test == "not_null":
        return f"select {key_expr} as failing_key from {model} where {col} is null"
    if test == "unique":
        return (f"select {col} as failing_key from {model} where {col} is not null "
                f"group by {col} having count(*) > 1")
    if test == "accepted_values":
        values = arg.get("values") if isinstance(arg, dict) else arg
        if not isinstance(values, list) or not values:
            raise ValueError("accepted_values needs {values: [...]}")
        listed = ", ".join(_sql_literal(v) for v in values)
        return (f"select {key_expr} as failing_key from {model} "
                f"where {col} is not null and {col} not in ({listed})")
    if test == "relationships":
        if not isinstance(arg, dict) or "to" not in arg or "field" not in arg:
            raise ValueError("relationships needs {to: schema.table, field: column}")
        # NULL foreign keys are allowed: "no parent yet" is not a broken reference.
        return (f"select child.{key_expr} as failing_key from {model} as child "
                f"where child.{col} is not null and not exists (select 1 from {arg['to']} as parent "
                f"where parent.{_quote(arg['field'])} = child.{col})")
    if test == "expression":
        if not isinstance(arg, str) or not arg.strip():
            raise ValueError("expression needs a SQL boolean, e.g. expression: \"total >= 0\"")
        # Like dbt's expression_is_true: a NULL result passes (not_null tests NULLs).
        return f"select {key_expr} as failing_key from {model} where not ({arg})"
    if test == "unique_combination":
        cols = arg.get("columns") if isinstance(arg, dict) else arg
        if not isinstance(cols, list) or not cols:
            raise ValueError("unique_combination needs a list of columns")
        listed = ", ".join(_quote(c) for c in cols)
        return (f"select concat_ws('|', {listed}) as failing_key from {model} "
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
        doc = yaml.safe_load(text) or {}
        node = yaml.compose(text)
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
        columns.append(ColumnDoc(str(col["name"]), str(col.get("description") or "").strip(),
                                 str(col.get("data_type") or "")))
        severity = str(col.get("severity", "error")).lower()
        for j, t in enumerate(col.get("tests") or []):
            raw_tests.append((str(col["name"]), t, severity,
                              _yaml_line(node, "columns", i, "tests", j)))
    for j, t in enumerate(doc.get("tests") or []):
        raw_tests.append((None, t, "error", _yaml_line(node, "tests", j)))

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
                                failing_sql=failing_sql))

    return _replace(base, description=str(doc.get("description") or "").strip(),
                    materialized=materialized, key=key, columns=tuple(columns), tests=tuple(tests))


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


def discover_models(sql_dir: Path | str | None = None) -> dict[str, Model]:
    """Every model under sql_dir (default: the repo's dbt_like_sql/), keyed by `schema.name`."""
    root = Path(sql_dir) if sql_dir is not None else SQL_DIR
    models: dict[str, Model] = {}
    for sql_path in sorted(root.glob("*/*.sql")):
        model = load_model(sql_path)
        models[model.fqn] = model
    return models


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
                strict_columns: bool = True) -> BuildResult:
    """Create or replace one model's table or view, with comments, in one transaction.

    Idempotent: re-running gives the same object. Raises ModelError naming the file and line
    when the SQL is broken, or when the sidecar documents a column the model does not produce.
    Undocumented model columns only warn.
    """
    if model.error is not None:
        raise model.error
    started = time.perf_counter()
    kind = model.materialized
    target = f"{_quote(model.schema)}.{_quote(model.name)}"
    warnings: list[str] = []
    con.execute("begin transaction")
    try:
        con.execute(f"create schema if not exists {_quote(model.schema)}")
        existing = _existing_kind(con, model.schema, model.name)
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
        if model.description:
            con.execute(f"comment on {kind} {target} is {_comment(model.description)}")
        for col in model.columns:
            if col.description and col.name in actual_names:
                con.execute(f"comment on column {target}.{_quote(col.name)} is "
                            f"{_comment(col.description)}")
        con.execute("commit")
    except BaseException:
        con.execute("rollback")
        raise
    for w in warnings:
        log.warning(w)
    row_count = con.execute(f"select count(*) from {target}").fetchone()[0]
    return BuildResult(model=model, row_count=int(row_count), columns=list(actual),
                       seconds=time.perf_counter() - started, warnings=warnings)


def run_tests(con: duckdb.DuckDBPyConnection, model: Model,
              check_names: Iterable[str] | None = None) -> list[TestResult]:
    """Run a model's tests (or the named ones) and return failing counts and sample keys."""
    wanted = set(check_names) if check_names is not None else None
    results: list[TestResult] = []
    for test in model.tests:
        if wanted is not None and test.check_name not in wanted:
            continue
        try:
            n, keys = con.execute(test.count_sql()).fetchone()
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
               tests: bool = False) -> list[BuildResult]:
    """Build all models (or a selection) in dependency order, without Dagster.

    With tests=True, every error-severity test failure raises ModelError after its model is built
    (warn-severity failures are logged), mirroring blocking checks in Dagster.
    """
    models = discover_models(sql_dir)
    results: list[BuildResult] = []
    for fqn in select_models(models, select, upstream=upstream):
        model = models[fqn]
        results.append(build_model(con, model))
        if tests:
            for r in run_tests(con, model):
                if r.passed:
                    continue
                msg = (f"test {r.test.check_name} on {fqn} failed: "
                       f"{r.error or f'{r.failing} rows, e.g. {r.sample_keys}'}")
                if r.test.severity == "error":
                    raise ModelError(model.sidecar_path or model.path, msg)
                log.warning(msg)
    return results
