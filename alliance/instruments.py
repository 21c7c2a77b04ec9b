"""Questionnaire instruments as data: load, validate and seed the definition files.

Each instrument is one YAML file in `schemas/instruments/` (plus any folder named in
$ALLIANCE_INSTRUMENTS_DIR, several separated by os.pathsep), so a clinic adds an instrument by
dropping a file. Loading is strict: a malformed file raises `InstrumentError` naming the file, the
line and the field. The definitions become the `seeds.*` tables the generic scoring SQL reads.

Values on which published sources disagree are written as a parameter block
(`{parameter: name, default: value, doc: ..., source: key}`); the default is used unless the
caller (or the YAML file named in $ALLIANCE_INSTRUMENT_PARAMETERS) overrides it by name.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from alliance import yamlio
from alliance.config import REPO_ROOT, SCHEMAS_DIR

INSTRUMENTS_DIR = SCHEMAS_DIR / "instruments"
ENV_DIRS = "ALLIANCE_INSTRUMENTS_DIR"
ENV_PARAMETERS = "ALLIANCE_INSTRUMENT_PARAMETERS"

CONSTRUCTS = ("alliance", "outcome")
KINDS = ("item_level", "total_only")
RULES = ("sum", "mean")
OPERATORS = ("<", "<=", ">", ">=")
PRORATE_METHODS = ("mean_substitution",)
AGE_GROUPS = ("any", "adult", "adolescent", "child")
# Jacobson & Truax (1991): reliable change = 1.96 * SD * sqrt(2) * sqrt(1 - reliability).
Z_95 = 1.959964

TOP_LEVEL = {
    "code", "version", "name", "construct", "kind", "source", "loinc", "items", "reverse_keyed",
    "subscales", "scoring", "prorating", "direction", "total", "bands", "caseness",
    "clinical_cutoff", "reliable_change", "critical_items", "alliance_concern", "sources",
}
REQUIRED = ("code", "version", "name", "construct", "kind", "source", "scoring", "prorating",
            "direction", "total", "sources")


def _compare(value: float, op: str, threshold: float) -> bool:
    """`value <op> threshold` for one of OPERATORS."""
    return {"<": value < threshold, "<=": value <= threshold,
            ">": value > threshold, ">=": value >= threshold}[op]


class InstrumentError(ValueError):
    """An instrument definition file is malformed (the message names file, line and field)."""


@dataclass(frozen=True)
class Item:
    number: int
    min_value: float
    max_value: float
    step: float
    reverse_keyed: bool = False
    critical_operator: str | None = None
    critical_threshold: float | None = None
    loinc: str | None = None


@dataclass(frozen=True)
class Subscale:
    name: str
    items: tuple[int, ...]
    rule: str
    source: str


@dataclass(frozen=True)
class Band:
    order: int
    label: str
    min_score: float
    max_score: float


@dataclass(frozen=True)
class Parameter:
    name: str
    field: str
    default: Any
    value: Any
    doc: str
    source: str
    alternatives: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Instrument:
    """One validated instrument definition (one code + version)."""

    code: str
    version: str
    name: str
    construct: str
    kind: str
    source_file: str
    scoring_rule: str
    higher_is_better: bool
    total_min: float
    total_max: float
    total_step: float | None
    items: tuple[Item, ...] = ()
    subscales: tuple[Subscale, ...] = ()
    prorate_max_missing: int = 0
    prorate_method: str | None = None
    bands: tuple[Band, ...] = ()
    caseness_threshold: float | None = None
    caseness_operator: str | None = None
    caseness_uses_cutoff: bool = False
    clinical_cutoffs: Mapping[str, float] = field(default_factory=dict)
    clinical_if: str | None = None
    reliable_change: float | None = None
    rc_sd: float | None = None
    rc_reliability: float | None = None
    alliance_concern_cutoff: float | None = None
    alliance_concern_operator: str | None = None
    loinc_panel: str | None = None
    loinc_total: str | None = None
    sources: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    citations: Mapping[str, str] = field(default_factory=dict)  # field -> source key
    parameters: tuple[Parameter, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.code, self.version)

    def cite(self, fld: str) -> str | None:
        """'Author (year)' for the source of one field, or None."""
        key = self.citations.get(fld)
        if key is None:
            return None
        s = self.sources[key]
        return f"{s['author']} ({s['year']})"


# --------------------------------------------------------------------------- YAML with line numbers


def _line_index(text: str) -> dict[str, int]:
    """Map 'a.b[0].c' field paths to 1-based line numbers, so errors can point at the line."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = f"{path}.{k.value}" if path else str(k.value)
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = f"{path}[{i}]"
                lines[p] = v.start_mark.line + 1
                walk(v, p)

    try:
        root = yamlio.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


class _Ctx:
    """Error reporting and parameter resolution for one file."""

    def __init__(self, path: Path, text: str, overrides: Mapping[str, Any]):
        self.path = path
        self.lines = _line_index(text)
        self.overrides = overrides
        self.sources: dict[str, Any] = {}
        self.citations: dict[str, str] = {}
        self.parameters: list[Parameter] = []

    def fail(self, fld: str, problem: str) -> InstrumentError:
        line = self.lines.get(fld)
        if line is None:  # fall back to the nearest enclosing field we know a line for
            parent = fld
            while line is None and ("." in parent or "[" in parent):
                parent = parent.rsplit(".", 1)[0] if "." in parent else parent.rsplit("[", 1)[0]
                line = self.lines.get(parent)
        where = f"{self.path}, line {line}" if line else str(self.path)
        return InstrumentError(f"{where}, field '{fld}': {problem}")

    # -- typed getters
    def mapping(self, v: Any, fld: str, allowed: Iterable[str] | None = None) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(fld, f"must be a mapping, got {type(v).__name__}")
        if allowed is not None:
            extra = set(map(str, v)) - set(allowed)
            if extra:
                raise self.fail(fld, f"unknown key(s) {sorted(extra)}; allowed: {sorted(allowed)}")
        return v

    def require(self, m: dict[str, Any], key: str, fld: str) -> Any:
        if key not in m or m[key] is None:
            raise self.fail(fld, f"missing required key '{key}'")
        return m[key]

    def resolve(self, v: Any, fld: str) -> Any:
        """A plain value, or a parameter block replaced by its override or default."""
        if not (isinstance(v, dict) and "parameter" in v):
            return v
        self.mapping(v, fld, {"parameter", "default", "doc", "alternatives", "source"})
        name = self.require(v, "parameter", fld)
        if not isinstance(name, str) or not name.replace("_", "").isalnum():
            raise self.fail(f"{fld}.parameter", "must be a name of letters, digits and '_'")
        if "default" not in v:
            raise self.fail(fld, f"parameter '{name}' needs a 'default'")
        if not v.get("doc"):
            raise self.fail(fld, f"parameter '{name}' needs a 'doc' explaining the choice")
        src = self.source_ref(v, fld)
        alternatives = tuple(v.get("alternatives") or ())
        value = self.overrides.get(name, v["default"])
        if alternatives and value not in alternatives:
            # (an overridden value was set elsewhere: say where, not only where it is used)
            origin = ""
            if name in self.overrides:
                origin = (f" (set in ${ENV_PARAMETERS} = {os.environ[ENV_PARAMETERS]})"
                          if os.environ.get(ENV_PARAMETERS) else " (set by the caller's parameters)")
            raise self.fail(fld, f"parameter '{name}' = {value!r}{origin} is not one of "
                                 f"{list(alternatives)}")
        self.parameters.append(
            Parameter(name, fld, v["default"], value, str(v["doc"]).strip(), src, alternatives)
        )
        return value

    def number(self, v: Any, fld: str, *, integer: bool = False) -> float:
        v = self.resolve(v, fld)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self.fail(fld, f"must be a number, got {v!r}")
        if integer and int(v) != v:
            raise self.fail(fld, f"must be a whole number, got {v!r}")
        return float(v)

    def choice(self, v: Any, fld: str, options: Iterable[str]) -> str:
        v = self.resolve(v, fld)
        opts = tuple(options)
        if v not in opts:
            raise self.fail(fld, f"must be one of {list(opts)}, got {v!r}")
        return str(v)

    def source_ref(self, m: dict[str, Any], fld: str, record: str | None = None) -> str:
        key = m.get("source")
        if key is None:
            raise self.fail(fld, "missing 'source': every value cites a key from 'sources'")
        if key not in self.sources:
            raise self.fail(f"{fld}.source", f"'{key}' is not listed under 'sources'")
        if record:
            self.citations[record] = key
        return str(key)

    def block(self, raw: dict[str, Any], key: str, allowed: set[str]) -> dict[str, Any] | None:
        """An optional section: absent or 'none' gives None, else a mapping with a source."""
        v = raw.get(key)
        if v is None or v == "none":
            return None
        m = self.mapping(v, key, allowed | {"source"})
        self.source_ref(m, key, record=key)
        return m


# --------------------------------------------------------------------------------------- parsing


def _parse_sources(ctx: _Ctx, raw: Any) -> dict[str, dict[str, Any]]:
    m = ctx.mapping(raw, "sources")
    if not m:
        raise ctx.fail("sources", "must list at least one source")
    out = {}
    for key, s in m.items():
        fld = f"sources.{key}"
        s = ctx.mapping(s, fld, {"author", "year", "title", "url", "doi"})
        if not s.get("author") or not isinstance(s["author"], str):
            raise ctx.fail(fld, "needs an 'author'")
        if not isinstance(s.get("year"), int) or not 1900 <= s["year"] <= 2100:
            raise ctx.fail(f"{fld}.year", f"must be a 4-digit year, got {s.get('year')!r}")
        out[str(key)] = dict(s)
    return out


def _item_numbers(ctx: _Ctx, v: Any, fld: str, n_items: int) -> tuple[int, ...]:
    v = ctx.resolve(v, fld)
    if not isinstance(v, list):
        raise ctx.fail(fld, f"must be a list of item numbers, got {v!r}")
    out = []
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= n_items:
            raise ctx.fail(f"{fld}[{i}]", f"must be an item number 1..{n_items}, got {x!r}")
        out.append(x)
    if len(set(out)) != len(out):
        raise ctx.fail(fld, "lists an item twice")
    return tuple(out)


def _on_grid(value: float, lo: float, step: float) -> bool:
    k = (value - lo) / step
    return abs(k - round(k)) < 1e-9


def parse_instrument(
    raw: Any, path: Path | str, text: str = "", overrides: Mapping[str, Any] | None = None
) -> Instrument:
    """Validate one parsed YAML document; `path` and `text` only serve the error messages."""
    ctx = _Ctx(Path(path), text, overrides or {})
    if not isinstance(raw, dict):
        raise InstrumentError(f"{path}: the file must hold one YAML mapping (an instrument)")
    unknown = set(map(str, raw)) - TOP_LEVEL
    if unknown:
        raise ctx.fail(sorted(unknown)[0], f"unknown field; allowed: {sorted(TOP_LEVEL)}")
    for key in REQUIRED:
        if raw.get(key) is None:
            raise InstrumentError(f"{path}: missing required field '{key}'")
    ctx.sources = _parse_sources(ctx, raw["sources"])

    code = raw["code"]
    if not isinstance(code, str) or not code.strip() or len(code) > 32:
        raise ctx.fail("code", f"must be a short text code such as 'PHQ-9', got {code!r}")
    version = raw["version"]
    if isinstance(version, bool) or not isinstance(version, str | int):
        raise ctx.fail("version", f"must be text such as \"1\", got {version!r}")
    version = str(version)
    name = raw["name"]
    if not isinstance(name, str):
        raise ctx.fail("name", "must be text")
    construct = ctx.choice(raw["construct"], "construct", CONSTRUCTS)
    kind = ctx.choice(raw["kind"], "kind", KINDS)
    ctx.source_ref({"source": raw["source"]}, "source", record="instrument")

    # ---- items
    items: list[Item] = []
    n_items = 0
    if kind == "item_level":
        m = ctx.mapping(ctx.require(raw, "items", "items"), "items",
                        {"count", "min", "max", "step", "loinc", "source"})
        ctx.source_ref(m, "items", record="items")
        n_items = int(ctx.number(ctx.require(m, "count", "items"), "items.count", integer=True))
        if not 1 <= n_items <= 500:
            raise ctx.fail("items.count", f"must be 1..500, got {n_items}")
        lo = ctx.number(ctx.require(m, "min", "items"), "items.min")
        hi = ctx.number(ctx.require(m, "max", "items"), "items.max")
        step = ctx.number(m.get("step", 1), "items.step")
        if not lo < hi:
            raise ctx.fail("items.max", f"must be above items.min ({lo:g}), got {hi:g}")
        if step <= 0 or not _on_grid(hi, lo, step):
            raise ctx.fail("items.step", f"must be > 0 and divide max - min, got {step:g}")
        loinc = m.get("loinc") or {}
        ctx.mapping(loinc, "items.loinc", {str(i) for i in range(1, n_items + 1)})

        rk_block = ctx.mapping(raw.get("reverse_keyed") or {"items": [], "source": raw["source"]},
                               "reverse_keyed", {"items", "source"})
        ctx.source_ref(rk_block, "reverse_keyed", record="reverse_keyed")
        reverse = set(_item_numbers(ctx, rk_block.get("items", []), "reverse_keyed.items", n_items))

        critical: dict[int, tuple[str, float]] = {}
        for i, c in enumerate(raw.get("critical_items") or []):
            fld = f"critical_items[{i}]"
            c = ctx.mapping(c, fld, {"item", "operator", "threshold", "source"})
            ctx.source_ref(c, fld, record="critical_items")
            (num,) = _item_numbers(ctx, [ctx.require(c, "item", fld)], f"{fld}.item", n_items)
            op = ctx.choice(ctx.require(c, "operator", fld), f"{fld}.operator", OPERATORS)
            thr = ctx.number(ctx.require(c, "threshold", fld), f"{fld}.threshold")
            # A rule no possible answer meets (or every answer meets) is a typo, not a rule: the
            # flag would never (or always) fire without anyone noticing.
            values = [lo + j * step for j in range(int(round((hi - lo) / step)) + 1)]
            hits = sum(_compare(v, op, thr) for v in values)
            if hits == 0 or hits == len(values):
                raise ctx.fail(f"{fld}.threshold",
                               f"'{op} {thr:g}' is {'never' if hits == 0 else 'always'} true for "
                               f"answers {lo:g}..{hi:g}: the item could "
                               f"{'never' if hits == 0 else 'only'} be flagged")
            critical[num] = (op, thr)

        for k in range(1, n_items + 1):
            op, thr = critical.get(k, (None, None))
            items.append(Item(k, lo, hi, step, k in reverse, op, thr,
                              str(loinc[str(k)]) if str(k) in loinc else None))
    elif raw.get("items") not in (None, "none") or raw.get("subscales") not in (None, "none", []):
        raise ctx.fail("items", "a total_only instrument has no items or subscales")

    # ---- subscales
    subscales: list[Subscale] = []
    seen: set[str] = set()
    for i, s in enumerate(raw.get("subscales") or []):
        fld = f"subscales[{i}]"
        s = ctx.mapping(s, fld, {"name", "items", "rule", "source"})
        sname = ctx.require(s, "name", fld)
        if not isinstance(sname, str) or sname in seen:
            raise ctx.fail(f"{fld}.name", f"must be a unique text name, got {sname!r}")
        seen.add(sname)
        nums = _item_numbers(ctx, ctx.require(s, "items", fld), f"{fld}.items", n_items)
        if not nums:
            raise ctx.fail(f"{fld}.items", "must list at least one item")
        rule = ctx.choice(s.get("rule", "sum"), f"{fld}.rule", RULES)
        subscales.append(Subscale(sname, nums, rule, ctx.source_ref(s, fld)))
    if subscales:
        ctx.citations["subscales"] = subscales[0].source

    # ---- scoring, prorating, direction, total
    sc = ctx.mapping(raw["scoring"], "scoring", {"rule", "source"})
    ctx.source_ref(sc, "scoring", record="scoring")
    rule = ctx.choice(ctx.require(sc, "rule", "scoring"), "scoring.rule", RULES)

    max_missing, method = 0, None
    pr = ctx.block(raw, "prorating", {"max_missing", "method"})
    if pr is not None:
        if kind == "total_only":
            raise ctx.fail("prorating", "a total_only instrument cannot be prorated; use 'none'")
        max_missing = int(ctx.number(ctx.require(pr, "max_missing", "prorating"),
                                     "prorating.max_missing", integer=True))
        if not 0 <= max_missing < n_items:
            raise ctx.fail("prorating.max_missing", f"must be 0..{n_items - 1}, got {max_missing}")
        method = ctx.choice(ctx.require(pr, "method", "prorating"), "prorating.method",
                            PRORATE_METHODS)

    d = ctx.mapping(raw["direction"], "direction", {"higher_is_better", "source"})
    ctx.source_ref(d, "direction", record="direction")
    hib = ctx.resolve(ctx.require(d, "higher_is_better", "direction"), "direction.higher_is_better")
    if not isinstance(hib, bool):
        raise ctx.fail("direction.higher_is_better", f"must be true or false, got {hib!r}")

    t = ctx.mapping(raw["total"], "total", {"min", "max", "step", "source"})
    ctx.source_ref(t, "total", record="total")
    tmin = ctx.number(ctx.require(t, "min", "total"), "total.min")
    tmax = ctx.number(ctx.require(t, "max", "total"), "total.max")
    tstep = ctx.number(t["step"], "total.step") if "step" in t else None
    if not tmin < tmax:
        raise ctx.fail("total.max", f"must be above total.min ({tmin:g})")
    if items:
        lo, hi = items[0].min_value, items[0].max_value
        expect = (lo * n_items, hi * n_items) if rule == "sum" else (lo, hi)
        if (tmin, tmax) != expect:
            raise ctx.fail("total", f"range {tmin:g}-{tmax:g} does not follow from the items "
                                    f"and the {rule} rule ({expect[0]:g}-{expect[1]:g})")

    # ---- bands
    bands: list[Band] = []
    b = ctx.block(raw, "bands", {"levels"})
    if b is not None:
        levels = ctx.require(b, "levels", "bands")
        if not isinstance(levels, list) or not levels:
            raise ctx.fail("bands.levels", "must be a non-empty list of {label, min, max}")
        for i, lv in enumerate(levels):
            fld = f"bands.levels[{i}]"
            lv = ctx.mapping(lv, fld, {"label", "min", "max"})
            label = ctx.require(lv, "label", fld)
            bmin = ctx.number(ctx.require(lv, "min", fld), f"{fld}.min")
            bmax = ctx.number(ctx.require(lv, "max", fld), f"{fld}.max")
            if bmin > bmax:
                raise ctx.fail(fld, f"min {bmin:g} is above max {bmax:g}")
            if bands and bmin <= bands[-1].max_score:
                raise ctx.fail(f"{fld}.min", "bands must ascend without overlap")
            bands.append(Band(i + 1, str(label), bmin, bmax))
        if bands[0].min_score != tmin or bands[-1].max_score != tmax:
            raise ctx.fail("bands.levels", f"must cover the total range {tmin:g}-{tmax:g}")

    # ---- clinical cutoffs (by age group) and caseness
    cutoffs: dict[str, float] = {}
    clinical_if = None
    cc = ctx.block(raw, "clinical_cutoff", {"values", "clinical_if", "sources"})
    if cc is not None:
        vals = ctx.mapping(ctx.require(cc, "values", "clinical_cutoff"), "clinical_cutoff.values",
                           AGE_GROUPS)
        for g, v in vals.items():
            cutoffs[str(g)] = ctx.number(v, f"clinical_cutoff.values.{g}")
        if not cutoffs:
            raise ctx.fail("clinical_cutoff.values", "needs at least one age group")
        clinical_if = ctx.choice(ctx.require(cc, "clinical_if", "clinical_cutoff"),
                                 "clinical_cutoff.clinical_if", OPERATORS)
        for g, key in ctx.mapping(cc.get("sources") or {}, "clinical_cutoff.sources",
                                  cutoffs).items():
            ctx.source_ref({"source": key}, f"clinical_cutoff.sources.{g}",
                           record=f"clinical_cutoff.{g}")

    cthr, cop, c_uses_cutoff = None, None, False
    ca = ctx.block(raw, "caseness", {"threshold", "operator"})
    if ca is not None:
        thr = ctx.require(ca, "threshold", "caseness")
        if thr == "clinical_cutoff":
            if not cutoffs:
                raise ctx.fail("caseness.threshold", "refers to clinical_cutoff, which is absent")
            c_uses_cutoff = True
        else:
            cthr = ctx.number(thr, "caseness.threshold")
        cop = ctx.choice(ctx.require(ca, "operator", "caseness"), "caseness.operator", OPERATORS)

    # ---- reliable change: a value, or SD and reliability to derive it
    rc = sd = rel = None
    r = ctx.block(raw, "reliable_change", {"value", "sd", "reliability"})
    if r is not None:
        if "value" in r:
            rc = ctx.number(r["value"], "reliable_change.value")
        elif "sd" in r and "reliability" in r:
            sd = ctx.number(r["sd"], "reliable_change.sd")
            rel = ctx.number(r["reliability"], "reliable_change.reliability")
            if not (sd > 0 and 0 < rel < 1):
                raise ctx.fail("reliable_change", "needs sd > 0 and 0 < reliability < 1")
            rc = round(Z_95 * sd * math.sqrt(2.0 * (1.0 - rel)), 4)
        else:
            raise ctx.fail("reliable_change", "needs 'value', or 'sd' and 'reliability'")
        if rc <= 0:
            raise ctx.fail("reliable_change.value", "must be above 0")

    # ---- alliance concern (SRS)
    acut = aop = None
    ac = ctx.block(raw, "alliance_concern", {"cutoff", "operator"})
    if ac is not None:
        if construct != "alliance":
            raise ctx.fail("alliance_concern", "only alliance instruments have an alliance concern")
        acut = ctx.number(ctx.require(ac, "cutoff", "alliance_concern"), "alliance_concern.cutoff")
        aop = ctx.choice(ctx.require(ac, "operator", "alliance_concern"),
                         "alliance_concern.operator", OPERATORS)

    lo_panel = lo_total = None
    lo = ctx.block(raw, "loinc", {"panel", "total"})
    if lo is not None:
        lo_panel = str(lo["panel"]) if lo.get("panel") else None
        lo_total = str(lo["total"]) if lo.get("total") else None

    return Instrument(
        code=code, version=version, name=name, construct=construct, kind=kind,
        source_file=str(path), scoring_rule=rule, higher_is_better=hib,
        total_min=tmin, total_max=tmax, total_step=tstep, items=tuple(items),
        subscales=tuple(subscales), prorate_max_missing=max_missing, prorate_method=method,
        bands=tuple(bands), caseness_threshold=cthr, caseness_operator=cop,
        caseness_uses_cutoff=c_uses_cutoff, clinical_cutoffs=cutoffs, clinical_if=clinical_if,
        reliable_change=rc, rc_sd=sd, rc_reliability=rel, alliance_concern_cutoff=acut,
        alliance_concern_operator=aop, loinc_panel=lo_panel, loinc_total=lo_total,
        sources=ctx.sources, citations=dict(ctx.citations), parameters=tuple(ctx.parameters),
    )


def load_instrument_file(path: Path, overrides: Mapping[str, Any] | None = None) -> Instrument:
    """Read and validate one definition file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InstrumentError(f"{path}: cannot be read ({e})") from e
    try:
        raw = yamlio.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark else str(path)
        raise InstrumentError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from e
    return parse_instrument(raw, path, text, overrides)


def _default_dirs() -> list[Path]:
    dirs = [INSTRUMENTS_DIR]
    for part in os.environ.get(ENV_DIRS, "").split(os.pathsep):
        if part.strip():
            dirs.append(Path(part.strip()))
    return dirs


def _env_parameters() -> dict[str, Any]:
    p = os.environ.get(ENV_PARAMETERS)
    if not p:
        return {}
    try:
        data = yamlio.safe_load(Path(p).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InstrumentError(f"{p}: cannot read instrument parameters ({e})") from e
    if not isinstance(data, dict):
        raise InstrumentError(f"{p}: must be a mapping of parameter name to value")
    return data


def load_instruments(
    dirs: Iterable[str | os.PathLike[str]] | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> dict[tuple[str, str], Instrument]:
    """All instrument definitions, keyed by (code, version).

    `dirs` defaults to schemas/instruments plus every folder in $ALLIANCE_INSTRUMENTS_DIR.
    `parameters` overrides parameter defaults by name (default: the YAML mapping in the file
    named by $ALLIANCE_INSTRUMENT_PARAMETERS). Raises InstrumentError on any malformed file, a
    missing folder, a duplicate (code, version) or an override naming no parameter.
    """
    folders = [Path(d) for d in dirs] if dirs is not None else _default_dirs()
    overrides = dict(parameters) if parameters is not None else _env_parameters()
    out: dict[tuple[str, str], Instrument] = {}
    for folder in folders:
        if not folder.is_dir():
            raise InstrumentError(f"{folder}: instrument folder does not exist")
        for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            inst = load_instrument_file(path, overrides)
            if inst.key in out:
                raise InstrumentError(
                    f"{path}: instrument {inst.code} version {inst.version} is already defined "
                    f"in {out[inst.key].source_file}; give the new one another version"
                )
            out[inst.key] = inst
    known = {p.name for i in out.values() for p in i.parameters}
    unknown = set(overrides) - known
    if unknown:
        raise InstrumentError(f"instrument parameters {sorted(unknown)} match no instrument "
                              f"parameter; known: {sorted(known)}")
    return out


# ------------------------------------------------------------------------------------ tables


def items_table(instruments: Mapping[tuple[str, str], Instrument]) -> pa.Table:
    """Valid items and answer ranges, for the ingest's contract checks.

    One row per item of each item-level instrument. A total-only instrument gets one row with
    item NULL whose range is the valid total range, so the ingest knows the instrument exists.
    """
    rows: dict[str, list[Any]] = {k: [] for k in (
        "instrument", "instrument_version", "item", "min_value", "max_value", "step", "kind")}
    for inst in sorted(instruments.values(), key=lambda i: i.key):
        entries = (
            [(str(it.number), it.min_value, it.max_value, it.step) for it in inst.items]
            if inst.kind == "item_level"
            else [(None, inst.total_min, inst.total_max, inst.total_step)]
        )
        for item, lo, hi, step in entries:
            rows["instrument"].append(inst.code)
            rows["instrument_version"].append(inst.version)
            rows["item"].append(item)
            rows["min_value"].append(lo)
            rows["max_value"].append(hi)
            rows["step"].append(step)
            rows["kind"].append(inst.kind)
    schema = pa.schema([
        ("instrument", pa.string()), ("instrument_version", pa.string()), ("item", pa.string()),
        ("min_value", pa.float64()), ("max_value", pa.float64()), ("step", pa.float64()),
        ("kind", pa.string()),
    ])
    return pa.table(rows, schema=schema)


def _citation_text(inst: Instrument, keys: Iterable[str]) -> str:
    out = []
    for k in dict.fromkeys(keys):
        s = inst.sources[k]
        out.append(f"{s['author']} ({s['year']})" + (f". {s['title']}" if s.get("title") else ""))
    return "; ".join(out)


# Each seed table: (description, [(column, duckdb type, description)]).
SEED_TABLES: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "instruments": (
        "One row per questionnaire instrument and version, built from schemas/instruments/*.yaml: "
        "scoring rule, direction, ranges, prorating, cutoffs, reliable change and citations.",
        [
            ("instrument", "varchar", "Instrument code, e.g. PHQ-9."),
            ("instrument_version", "varchar", "Version of the definition, e.g. '1'."),
            ("name", "varchar", "Full instrument name."),
            ("construct", "varchar", "'alliance' or 'outcome'."),
            ("kind", "varchar", "'item_level' (scored from answers) or 'total_only' (a total is sent)."),
            ("scoring_rule", "varchar", "'sum' or 'mean' of the (reverse-keyed) item scores."),
            ("n_items", "integer", "Number of items (0 for total-only instruments)."),
            ("item_min", "double", "Lowest item answer."),
            ("item_max", "double", "Highest item answer."),
            ("total_min", "double", "Lowest possible total."),
            ("total_max", "double", "Highest possible total."),
            ("higher_is_better", "boolean", "True when a higher total means better functioning or alliance."),
            ("prorate_max_missing", "integer", "Most missing items for which a total is still prorated (0 = all items needed)."),
            ("prorate_method", "varchar", "How missing items are prorated ('mean_substitution'), NULL when not allowed."),
            ("caseness_threshold", "double", "Total compared with caseness_operator to decide caseness (NULL: by clinical cutoff or none)."),
            ("caseness_operator", "varchar", "Comparison for caseness: '<', '<=', '>' or '>='."),
            ("caseness_uses_cutoff", "boolean", "True when caseness means 'in the clinical range' of the age-specific clinical cutoff."),
            ("clinical_if", "varchar", "Comparison of total with the clinical cutoff that means 'clinical range'."),
            ("reliable_change", "double", "Smallest change in total counted as reliable."),
            ("rc_sd", "double", "SD used to derive reliable change (Jacobson & Truax 1991), when given."),
            ("rc_reliability", "double", "Reliability used to derive reliable change, when given."),
            ("alliance_concern_cutoff", "double", "Alliance instruments: total compared with alliance_concern_operator flags a concern."),
            ("alliance_concern_operator", "varchar", "Comparison for the alliance concern ('<' = below the cutoff)."),
            ("critical_items", "varchar", "Critical items and their rule, e.g. '9>0'."),
            ("loinc_panel", "varchar", "LOINC code of the panel, where one exists."),
            ("loinc_total", "varchar", "LOINC code of the total score, where one exists."),
            ("citations", "varchar", "Every source the definition cites (author, year, title)."),
            ("field_sources", "varchar", "JSON: which source each field's value comes from."),
            ("parameters", "varchar", "JSON: parameters (where sources disagree) with default and value used."),
            ("source_file", "varchar", "Definition file the row was built from."),
        ],
    ),
    "instrument_items": (
        "One row per item of each item-level instrument: answer range, step, reverse keying, "
        "critical-item rule and LOINC code. Item numbers only, never item wording.",
        [
            ("instrument", "varchar", "Instrument code."),
            ("instrument_version", "varchar", "Definition version."),
            ("item", "varchar", "Item number as text, '1'..'n' (the key used in answers)."),
            ("item_number", "integer", "Item number as an integer, for ordering."),
            ("min_value", "double", "Lowest valid answer."),
            ("max_value", "double", "Highest valid answer."),
            ("step", "double", "Answer resolution (1 for whole numbers, 0.1 for SRS/ORS lines)."),
            ("reverse_keyed", "boolean", "True when scored as min + max - answer."),
            ("critical_operator", "varchar", "Comparison that makes the answer critical, e.g. '>' (NULL: not a critical item)."),
            ("critical_threshold", "double", "Value the answer is compared with (PHQ-9 item 9: > 0)."),
            ("loinc", "varchar", "LOINC code of the item, where one exists."),
        ],
    ),
    "instrument_subscales": (
        "One row per subscale item: which items make up each subscale and how it is scored.",
        [
            ("instrument", "varchar", "Instrument code."),
            ("instrument_version", "varchar", "Definition version."),
            ("subscale", "varchar", "Subscale name, e.g. 'bond'."),
            ("item", "varchar", "Item number as text."),
            ("scoring_rule", "varchar", "'sum' or 'mean' of the subscale's item scores."),
            ("n_items", "integer", "Number of items in the subscale."),
            ("citation", "varchar", "Source of the subscale key."),
        ],
    ),
    "instrument_bands": (
        "Severity bands per instrument: a total falls in the band whose min_score..max_score holds "
        "it (non-integer totals fall in the band with the highest min_score not above them).",
        [
            ("instrument", "varchar", "Instrument code."),
            ("instrument_version", "varchar", "Definition version."),
            ("band_order", "integer", "1 = lowest scores."),
            ("band", "varchar", "Band label, e.g. 'moderately_severe'."),
            ("min_score", "double", "Lowest total in the band (inclusive)."),
            ("max_score", "double", "Highest total in the band (inclusive)."),
            ("citation", "varchar", "Source of the bands."),
        ],
    ),
    "instrument_cutoffs": (
        "Clinical cutoffs per instrument and age group ('any' applies to every age group).",
        [
            ("instrument", "varchar", "Instrument code."),
            ("instrument_version", "varchar", "Definition version."),
            ("age_group", "varchar", "'any', 'adult', 'adolescent' or 'child'."),
            ("clinical_cutoff", "double", "The cutoff value."),
            ("clinical_if", "varchar", "Comparison of total with the cutoff meaning 'clinical range'."),
            ("citation", "varchar", "Source of the cutoff."),
        ],
    ),
    "instrument_parameters": (
        "Instrument values where published sources disagree: the default, the value in use and why.",
        [
            ("instrument", "varchar", "Instrument code."),
            ("instrument_version", "varchar", "Definition version."),
            ("parameter", "varchar", "Parameter name (override it in $ALLIANCE_INSTRUMENT_PARAMETERS)."),
            ("field", "varchar", "Definition field the parameter sets."),
            ("default_value", "varchar", "JSON of the documented default."),
            ("value_used", "varchar", "JSON of the value in use."),
            ("alternatives", "varchar", "JSON list of accepted values, if restricted."),
            ("doc", "varchar", "Why the parameter exists and what the default means."),
            ("citation", "varchar", "Source of the default."),
        ],
    ),
}


def seed_rows(instruments: Mapping[tuple[str, str], Instrument]) -> dict[str, list[tuple]]:
    """The seed tables as rows (same column order as SEED_TABLES)."""
    t: dict[str, list[tuple]] = {k: [] for k in SEED_TABLES}
    for inst in sorted(instruments.values(), key=lambda i: i.key):
        c, v = inst.code, inst.version
        lo = inst.items[0].min_value if inst.items else None
        hi = inst.items[0].max_value if inst.items else None
        crit = ",".join(f"{i.number}{i.critical_operator}{i.critical_threshold:g}"
                        for i in inst.items if i.critical_operator) or None
        t["instruments"].append((
            c, v, inst.name, inst.construct, inst.kind, inst.scoring_rule, len(inst.items), lo, hi,
            inst.total_min, inst.total_max, inst.higher_is_better, inst.prorate_max_missing,
            inst.prorate_method if inst.prorate_max_missing else None, inst.caseness_threshold,
            inst.caseness_operator, inst.caseness_uses_cutoff, inst.clinical_if,
            inst.reliable_change, inst.rc_sd, inst.rc_reliability, inst.alliance_concern_cutoff,
            inst.alliance_concern_operator, crit, inst.loinc_panel, inst.loinc_total,
            _citation_text(inst, inst.sources),
            json.dumps({f: inst.cite(f) for f in sorted(inst.citations)}),
            json.dumps([{"name": p.name, "default": p.default, "value": p.value}
                        for p in inst.parameters]),
            _relpath(inst.source_file),
        ))
        for it in inst.items:
            t["instrument_items"].append((
                c, v, str(it.number), it.number, it.min_value, it.max_value, it.step,
                it.reverse_keyed, it.critical_operator, it.critical_threshold, it.loinc))
        for s in inst.subscales:
            for n in s.items:
                t["instrument_subscales"].append((
                    c, v, s.name, str(n), s.rule, len(s.items), _citation_text(inst, [s.source])))
        for b in inst.bands:
            t["instrument_bands"].append((
                c, v, b.order, b.label, b.min_score, b.max_score, inst.cite("bands")))
        for g, cut in inst.clinical_cutoffs.items():
            src = inst.cite(f"clinical_cutoff.{g}") or inst.cite("clinical_cutoff")
            t["instrument_cutoffs"].append((c, v, g, cut, inst.clinical_if, src))
        for p in inst.parameters:
            t["instrument_parameters"].append((
                c, v, p.name, p.field, json.dumps(p.default), json.dumps(p.value),
                json.dumps(list(p.alternatives)) if p.alternatives else None, p.doc,
                _citation_text(inst, [p.source])))
    return t


def _relpath(path: str) -> str:
    # Repo-relative for shipped files, so the seeds do not depend on the checkout location.
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return path


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _insert(con: Any, table: str, columns: list[str], rows: list[tuple]) -> None:
    # Through Arrow, because executemany costs a round trip per row.
    data = pa.table({c: [r[i] for r in rows] for i, c in enumerate(columns)})
    con.register("_seed_rows", data)
    try:
        con.execute(f"insert into {table} by name select * from _seed_rows")
    finally:
        con.unregister("_seed_rows")


def write_seed_tables(con: Any, instruments: Mapping[tuple[str, str], Instrument]) -> dict[str, int]:
    """Create or replace the seeds.instrument* tables with comments; returns row counts by table.

    `con` is a DuckDB connection. Runs in one transaction so readers never see half the seeds.
    """
    rows = seed_rows(instruments)
    counts: dict[str, int] = {}
    con.execute("begin transaction")
    try:
        con.execute("create schema if not exists seeds")
        for table, (doc, cols) in SEED_TABLES.items():
            fq = f"seeds.{table}"
            con.execute(f"create or replace table {fq} ("
                        + ", ".join(f"{n} {t}" for n, t, _ in cols) + ")")
            if rows[table]:
                _insert(con, fq, [n for n, _, _ in cols], rows[table])
            con.execute(f"comment on table {fq} is {_quote(doc)}")
            for n, _, d in cols:
                con.execute(f"comment on column {fq}.{n} is {_quote(d)}")
            counts[table] = len(rows[table])
        con.execute("commit")
    except Exception:
        con.execute("rollback")
        raise
    return counts


PARAMETER_COLUMNS = [
    ("name", "varchar", "Parameter name, referenced by SQL models via seeds.parameters."),
    ("value_double", "double", "Numeric value (NULL when the value is text or a list)."),
    ("value_text", "varchar", "Value as text (JSON for lists and booleans)."),
    ("doc", "varchar", "What the parameter controls and why the default was chosen."),
    ("source", "varchar", "Published source (author, year) of the default."),
]


def parse_parameters(raw: Any, path: Path | str) -> list[tuple[Any, ...]]:
    """Validate the parameters file (a list of {name, value, doc, source}) into table rows."""
    if raw is None:
        return []
    if isinstance(raw, dict) and "parameters" in raw:
        raw = raw["parameters"]
    if not isinstance(raw, list):
        raise InstrumentError(f"{path}: must be a list of {{name, value, doc, source}}")
    rows, seen = [], set()
    for i, p in enumerate(raw):
        where = f"{path}, entry {i + 1}"
        if not isinstance(p, dict):
            raise InstrumentError(f"{where}: must be a mapping with name, value, doc, source")
        extra = set(p) - {"name", "value", "doc", "source"}
        if extra:
            raise InstrumentError(f"{where}: unknown field(s) {sorted(extra)}")
        for k in ("name", "value", "doc", "source"):
            if p.get(k) is None:
                raise InstrumentError(f"{where}, field '{k}': missing")
        name = p["name"]
        if name in seen:
            raise InstrumentError(f"{where}, field 'name': '{name}' appears twice")
        seen.add(name)
        v = p["value"]
        num = float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None
        text = v if isinstance(v, str) else json.dumps(v)
        rows.append((str(name), num, text, str(p["doc"]).strip(), str(p["source"])))
    return rows


def write_parameters_table(con: Any, path: Path) -> int:
    """Create or replace seeds.parameters from a parameters YAML file; returns the row count."""
    try:
        raw = yamlio.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise InstrumentError(f"{path}: cannot be read as YAML ({e})") from e
    rows = parse_parameters(raw, path)
    con.execute("begin transaction")
    try:
        con.execute("create schema if not exists seeds")
        con.execute("create or replace table seeds.parameters ("
                    + ", ".join(f"{n} {t}" for n, t, _ in PARAMETER_COLUMNS) + ")")
        if rows:
            _insert(con, "seeds.parameters", [n for n, _, _ in PARAMETER_COLUMNS], rows)
        con.execute("comment on table seeds.parameters is "
                    + _quote(f"Clinical rule parameters with citations, from {path.name}."))
        for n, _, d in PARAMETER_COLUMNS:
            con.execute(f"comment on column seeds.parameters.{n} is {_quote(d)}")
        con.execute("commit")
    except Exception:
        con.execute("rollback")
        raise
    return len(rows)
