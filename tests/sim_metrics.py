"""Independent readers of simulator output for tests: the metrics computed from NDJSON alone."""

from __future__ import annotations

import gzip
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any


def read_lines(landing: Path) -> list[tuple[str, int, str]]:
    """(file name, 1-based line number, text) for every line of every export, in file order."""
    out = []
    for f in sorted(landing.glob("export-*.ndjson*")):
        opener = gzip.open if f.name.endswith(".gz") else open
        with opener(f, "rt", encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                out.append((f.name, i, line.rstrip("\n")))
    return out


def accepted_events(landing: Path, bad: set[tuple[str, int]]) -> list[dict[str, Any]]:
    """Parsed events except the lines the ground truth lists as bad (first occurrence wins)."""
    seen: set[str] = set()
    events = []
    for name, n, text in read_lines(landing):
        if (name, n) in bad:
            continue
        e = json.loads(text)
        if e["event_id"] in seen:
            continue
        seen.add(e["event_id"])
        events.append(e)
    return events


def resolved_scores(events: list[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[str, str, float]]]:
    """Latest non-retracted version of every response, as (episode, instrument) -> [(time, session, total)].

    Totals are item sums, prorated when items are missing (as the scoring model does).
    """
    versions: dict[str, dict[str, Any]] = {}
    meta: dict[str, dict[str, Any]] = {}
    retracted = set()
    for e in events:
        t = e["event_type"]
        if t == "questionnaire.submitted":
            versions.setdefault(e["event_id"], e)
            meta[e["event_id"]] = e
        elif t == "questionnaire.amended":
            versions[e["payload"]["amends_event_id"]] = e
        elif t == "questionnaire.retracted":
            retracted.add(e["payload"]["retracts_event_id"])
    out: dict[tuple[str, str], list[tuple[str, str, float]]] = defaultdict(list)
    for rid, e in versions.items():
        if rid in retracted or rid not in meta:
            continue
        pl = e["payload"]
        vals = [v for v in pl["answers"].values() if v is not None]
        total = sum(vals) * len(pl["answers"]) / len(vals)
        orig = meta[rid]
        out[(orig["episode_id"], pl["instrument"])].append(
            (pl["administered_at"], orig.get("session_id"), round(total, 2)))
    for v in out.values():
        v.sort()
    return out


def pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def alliance_outcome_r(scores: dict[tuple[str, str], list[tuple[str, str, float]]]) -> tuple[float, int]:
    """Early alliance (mean of first 3 SRS) vs PHQ-9 improvement residualised on intake PHQ-9."""
    rows = []
    for (ep, inst), srs in scores.items():
        if inst != "SRS" or len(srs) < 3:
            continue
        phq = scores.get((ep, "PHQ-9"), [])
        if len(phq) < 2:
            continue
        early = sum(t for _, _, t in srs[:3]) / 3
        rows.append((early, phq[0][2], phq[0][2] - phq[-1][2]))
    x0 = [r[1] for r in rows]
    imp = [r[2] for r in rows]
    m0, mi = sum(x0) / len(x0), sum(imp) / len(imp)
    beta = sum((a - m0) * (b - mi) for a, b in zip(x0, imp, strict=True)) / sum((a - m0) ** 2 for a in x0)
    resid = [b - mi - beta * (a - m0) for a, b in zip(x0, imp, strict=True)]
    return pearson([r[0] for r in rows], resid), len(rows)
