"""Runs a suite of Great Expectations expectations on a DataFrame and condenses the result.

Suites are described as plain data (`ExpectationSpec`: a GX expectation class name and its
arguments, plus the Dagster check it belongs to), so building and inspecting them costs nothing;
Great Expectations itself (about 3-6 s to import) is only imported here, inside functions, when
there is something to validate.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# GX ships anonymous usage statistics on by default; a clinic warehouse must not phone home.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

MAX_FAILING_KEYS = 5
# Small on purpose: counts plus a handful of row locations, never the whole unexpected list.
RESULT_FORMAT_LIMIT = 20


@dataclass(frozen=True)
class ExpectationSpec:
    """One GX expectation, by class name and arguments, and the Dagster check it rolls up into."""

    check: str
    expectation: str  # a class name in great_expectations.expectations, e.g. "ExpectColumnValuesToNotBeNull"
    kwargs: dict[str, Any]
    # (column, value) the expectation is restricted to, e.g. ("event_type", "session.attended")
    where: tuple[str, Any] | None = None

    def describe(self) -> str:
        """A short human-readable label: the expectation, its column(s) and restriction."""
        cols = [str(self.kwargs[k]) for k in ("column", "column_A", "column_B") if k in self.kwargs]
        if "column_list" in self.kwargs:
            cols.append("+".join(self.kwargs["column_list"]))
        label = f"{self.expectation}({', '.join(cols)})"
        if self.where:
            label += f" where {self.where[0]} = {self.where[1]!r}"
        return label


@dataclass
class ExpectationOutcome:
    """What one expectation found: success, unexpected count and a few failing row keys."""

    spec: ExpectationSpec
    success: bool
    unexpected_count: int
    element_count: int
    failing_keys: list[str] = field(default_factory=list)
    error: str | None = None
    # Every file with a failing row (validate_frame's `file_column`), not only the few keys'
    failing_files: set[int] = field(default_factory=set)


@dataclass
class CheckOutcome:
    """One Dagster check's verdict: its expectations rolled up."""

    check: str
    passed: bool
    unexpected_count: int
    failing_expectations: list[str]
    failing_keys: list[str]
    expectations_evaluated: int
    errors: list[str] = field(default_factory=list)
    # The suite validation it came from (GX checks), for Data Docs; never in metadata or history.
    suite_result: Any = field(default=None, repr=False, compare=False)
    # Every file with a failing row, where the suite was validated with a file column (the
    # batch suites): a blocking failure names them all for rejection, not only the keys' files.
    failing_files: set[int] = field(default_factory=set)

    def metadata(self) -> dict[str, Any]:
        """Plain metadata for Dagster and the history table (counts and pseudonyms only)."""
        md: dict[str, Any] = {
            "expectation": "; ".join(self.failing_expectations) or "all passed",
            "unexpected_count": self.unexpected_count,
            "failing_keys": ", ".join(self.failing_keys),
            "expectations_evaluated": self.expectations_evaluated,
        }
        if self.errors:
            md["errors"] = "; ".join(self.errors)
        return md


@dataclass
class SuiteResult:
    """The outcome of validating one suite on one DataFrame."""

    suite: str
    rows: int
    outcomes: list[ExpectationOutcome]
    gx_result: Any = None  # the (scrubbed) GX ExpectationSuiteValidationResult, for Data Docs

    def checks(self, check_names: Iterable[str] | None = None) -> dict[str, CheckOutcome]:
        """Roll expectation outcomes up per check; checks with no expectations pass."""
        names = list(check_names) if check_names is not None else []
        for o in self.outcomes:
            if o.spec.check not in names:
                names.append(o.spec.check)
        out: dict[str, CheckOutcome] = {}
        for name in names:
            mine = [o for o in self.outcomes if o.spec.check == name]
            failed = [o for o in mine if not o.success]
            keys: list[str] = []
            for o in failed:
                for k in o.failing_keys:
                    if k not in keys and len(keys) < MAX_FAILING_KEYS:
                        keys.append(k)
            out[name] = CheckOutcome(
                check=name,
                passed=not failed,
                unexpected_count=sum(o.unexpected_count for o in failed),
                failing_expectations=[
                    f"{o.spec.describe()}: {o.unexpected_count} unexpected" for o in failed
                ],
                failing_keys=keys,
                expectations_evaluated=len(mine),
                errors=[f"{o.spec.describe()}: {o.error}" for o in mine if o.error],
                failing_files=set().union(*(o.failing_files for o in failed)),
            )
        return out


_lock = threading.Lock()
_state: dict[str, Any] = {}


def _context() -> Any:
    """A process-wide ephemeral GX context with one pandas DataFrame asset (created once)."""
    with _lock:
        if "batch_definition" not in _state:
            import great_expectations as gx
            from great_expectations.data_context.types.base import ProgressBarsConfig

            logging.getLogger("great_expectations").setLevel(logging.WARNING)
            ctx = gx.get_context(mode="ephemeral")
            ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
            asset = ctx.data_sources.add_pandas("alliance").add_dataframe_asset("frame")
            _state["context"] = ctx
            _state["batch_definition"] = asset.add_batch_definition_whole_dataframe("whole")
        return _state["batch_definition"]


def defer_preload() -> None:
    """Have `release_preload` start the preload: the run's ingest step calls it when it is done.

    The ingest is CPU-bound on every core; an import beside it took 2-2.5 s of its wall time at
    10^6 events (the import's CPU and the GIL its Python parts need), more than it saved later.
    """
    with _lock:
        _state["deferred"] = True


def release_preload() -> None:
    """Start a deferred preload (no-op when none was deferred)."""
    with _lock:
        deferred = _state.pop("deferred", False)
    if deferred:
        preload_in_background()


def preload_in_background() -> threading.Thread:
    """Start importing GX and creating its context in a daemon thread; return the thread.

    Importing Great Expectations costs 3-6 s of CPU in a fresh process, a fixed cost that a small
    (incremental) batch cannot amortise. Started when a run that validates begins
    (quality.checks.GreatExpectationsResource), or, in a run that ingests, when the ingest's
    DuckDB work is done (`defer_preload`), the import overlaps other steps. `_context()` waits
    for the thread (the lock), so a validation never sees a half-built context; if the thread
    fails, the validation imports GX itself and raises the error where it belongs.
    """
    def _load() -> None:
        try:
            _context()
        except Exception:  # noqa: BLE001 - the validation retries and reports the error itself
            logging.getLogger(__name__).debug("GX preload failed", exc_info=True)

    with _lock:
        thread = _state.get("preload")
        if thread is None:
            # sqlalchemy.orm is imported here, in the caller's thread, first: GX imports it in the
            # preload thread while Dagster may import it lazily in the run's thread (checking a
            # result's target materialization), and two threads importing its circular modules
            # at once gave "partially initialized module 'sqlalchemy.orm.exc'" (a failed step).
            import sqlalchemy.orm  # noqa: F401

            thread = threading.Thread(target=_load, name="gx-preload", daemon=True)
            _state["preload"] = thread
            thread.start()
    return thread


def _build_expectation(spec: ExpectationSpec) -> Any:
    import great_expectations.expectations as gxe

    kwargs = dict(spec.kwargs)
    if spec.where is not None:
        from great_expectations.expectations.row_conditions import Column

        kwargs["row_condition"] = Column(spec.where[0]) == spec.where[1]
        kwargs["condition_parser"] = "great_expectations"
    cls = getattr(gxe, spec.expectation)
    return cls(**kwargs, meta={"check": spec.check, "label": spec.describe()})


def _is_null(value: Any) -> bool:
    if value is None:
        return True
    try:
        import pandas as pd

        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists and the like: not a scalar null
        return False


def _keys(entries: Sequence[dict[str, Any]] | None, key_columns: Sequence[str]) -> list[str]:
    """Row locations from GX's partial index list, keeping only the key columns (never values)."""
    keys: list[str] = []
    for entry in entries or []:
        # (pandas gives NaN / NA / NaT for a NULL key, which is no location)
        parts = [f"{c}={entry[c]}" for c in key_columns if c in entry and not _is_null(entry[c])]
        if parts:
            k = " ".join(parts)
            if k not in keys:
                keys.append(k)
        if len(keys) >= MAX_FAILING_KEYS:
            break
    return keys


# Result fields that can carry cell values (possibly a malformed, i.e. raw, identifier).
_VALUE_FIELDS = (
    "partial_unexpected_list",
    "partial_unexpected_counts",
    "partial_unexpected_index_list",
    "unexpected_list",
    "unexpected_index_list",
    "unexpected_index_query",
    "observed_value",
)


def _suite(name: str, specs: Sequence[ExpectationSpec]) -> Any:
    """A GX suite of `specs`, duplicates dropped (a suite is a set, as `add_expectation` keeps it).

    Built through the constructor: `add_expectation` compares each new expectation with every
    one already added (pydantic `.dict()` both sides), ~0.25 s for the ~80 of the events suite.
    """
    import great_expectations as gx

    unique: dict[tuple[str, str, Any], ExpectationSpec] = {}
    for s in specs:
        unique.setdefault((s.expectation, repr(s.kwargs), s.where), s)
    return gx.ExpectationSuite(
        name=name, expectations=[_build_expectation(s) for s in unique.values()])


def _detail_format(index_cols: Sequence[str], complete: bool = False) -> dict[str, Any]:
    """The result format that yields failing row keys (unexpected index lists); `complete` lists
    every failing row's index columns, not only the first RESULT_FORMAT_LIMIT."""
    fmt: dict[str, Any] = {"result_format": "COMPLETE" if complete else "SUMMARY",
                           "partial_unexpected_count": RESULT_FORMAT_LIMIT}
    if index_cols:
        fmt["unexpected_index_column_names"] = list(index_cols)
    return fmt


def validate_frame(
    df: Any,
    suite_name: str,
    specs: Sequence[ExpectationSpec],
    key_columns: Sequence[str],
    file_column: str | None = None,
) -> SuiteResult:
    """Validate `df` (pandas DataFrame) against `specs` with GX; return condensed outcomes.

    `key_columns` are the columns reported as failing keys (row locations or pseudonyms); they must
    be columns of `df`. With `file_column` (one of the key columns), a failed expectation also
    lists every file with a failing row (`failing_files`): its detail pass asks GX for the
    COMPLETE unexpected index list, only for the expectations that failed. Cell values never leave this function: they are scrubbed from the GX result
    before it is returned (so Data Docs never show a malformed, possibly raw, identifier).

    Two passes, same verdicts: every expectation is first evaluated with GX's BASIC result format
    (success, element and unexpected counts); only the expectations that failed are evaluated
    again with SUMMARY and the key columns as unexpected index columns, for their failing keys.
    SUMMARY with index columns makes GX compute two or three more metrics per expectation (each
    one a `DataFrame.query` for row-conditioned expectations), which is most of the cost of a
    small batch where nearly everything passes (docs/quality.md, "Incremental cost").
    """
    if not specs:
        return SuiteResult(suite_name, len(df), [])
    batch_definition = _context()
    batch = batch_definition.get_batch(batch_parameters={"dataframe": df})
    index_cols = [c for c in key_columns if c in df.columns]
    res = batch.validate(_suite(suite_name, specs), result_format={"result_format": "BASIC"})
    by_label = {s.describe(): s for s in specs}
    failed = [by_label[r.expectation_config.meta["label"]] for r in res.results if not r.success]
    by_file = file_column is not None and file_column in index_cols
    if failed:
        detail = batch.validate(_suite(suite_name, failed),
                                result_format=_detail_format(index_cols, complete=by_file))
        detailed = {r.expectation_config.meta["label"]: r for r in detail.results}
        # The GX result keeps BASIC results for passing expectations, SUMMARY for failing ones.
        res.results = [detailed.get(r.expectation_config.meta["label"], r) for r in res.results]
    outcomes: list[ExpectationOutcome] = []
    for r in res.results:
        spec = by_label[r.expectation_config.meta["label"]]
        result = r.result or {}
        error = None
        if r.exception_info and r.exception_info.get("raised_exception"):
            error = str(r.exception_info.get("exception_message", "error"))[:300]
        outcomes.append(
            ExpectationOutcome(
                spec=spec,
                success=bool(r.success),
                unexpected_count=int(result.get("unexpected_count") or (0 if r.success else 1)),
                element_count=int(result.get("element_count") or len(df)),
                failing_keys=_keys(result.get("partial_unexpected_index_list"), index_cols),
                error=error,
                failing_files={int(row[file_column]) for row in result.get("unexpected_index_list") or ()
                               if by_file and isinstance(row, dict) and row.get(file_column) is not None},
            )
        )
        if "observed_value" in result and not isinstance(result["observed_value"], int | float):
            result.pop("observed_value")
        for f in _VALUE_FIELDS[:-1]:
            result.pop(f, None)
    return SuiteResult(suite_name, len(df), outcomes, gx_result=res)


def build_data_docs(results: Sequence[SuiteResult], docs_dir: str | os.PathLike[str]) -> Path | None:
    """Store scrubbed validation results in a file GX context under `docs_dir` and render Data Docs.

    Returns the site's index.html (`<docs_dir>/site/index.html`), or None when nothing was stored.
    """
    stored = [r for r in results if r.gx_result is not None]
    if not stored:
        return None
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    root = Path(docs_dir)
    root.mkdir(parents=True, exist_ok=True)
    site = root / "site"
    with _lock:
        ctx = gx.get_context(mode="file", project_root_dir=str(root))
        ctx.update_data_docs_site(
            "local_site",
            {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(site),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        ) if "local_site" in ctx.get_config().data_docs_sites else None
        ids = []
        for r in stored:
            run_id = RunIdentifier(run_name=r.gx_result.meta.get("run_id", {}).get("run_name")
                                   if isinstance(r.gx_result.meta.get("run_id"), dict) else None)
            key = ValidationResultIdentifier(
                expectation_suite_identifier=ExpectationSuiteIdentifier(name=r.suite),
                run_id=run_id,
                batch_identifier=r.suite,
            )
            ctx.validation_results_store.set(key, r.gx_result)
            ids.append(key)
        ctx.build_data_docs(resource_identifiers=ids)
    index = site / "index.html"
    return index if index.exists() else None
