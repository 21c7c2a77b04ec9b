"""Clinic simulator: synthetic canonical NDJSON exports with a known ground truth.

`simulate()` is the entry point; docs/simulator.md describes the model and the ground truth.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

from alliance.simulation.generate import BAD_KINDS, EXPECTED_REASON, Simulator
from alliance.simulation.model import SimParams, tang_derubeis
from alliance.simulation.writer import DayWriter

__all__ = ["BAD_KINDS", "EXPECTED_REASON", "SimParams", "simulate", "tang_derubeis",
           "default_truth_path"]

PILOT_PATIENTS = 400


def default_truth_path(out_dir: str | os.PathLike[str]) -> Path:
    """`<out>/../simulation_truth.json`: beside the landing folder, never inside it."""
    return Path(out_dir).resolve().parent / "simulation_truth.json"


def events_per_patient(params: SimParams) -> float:
    """Valid events per patient for these settings, measured on a small pilot (no files)."""
    pilot = Simulator(replace(params, seed=params.seed + 1_000_003))
    n = min(PILOT_PATIENTS, max(50, params.patients))
    pilot.run(None, max_patients=n)
    return pilot.n_valid / n


def simulate(out_dir: str | os.PathLike[str], *, clinics: int = 3, patients: int = 1500,
             seed: int = 42, start: date = date(2025, 1, 6), months: int = 18,
             therapists_per_clinic: int = 10, gzip: bool = False, bad_share: float = 0.01,
             alliance_outcome_r: float = 0.28, truth_path: str | os.PathLike[str] | None = None,
             events_target: int | None = None, **options: Any) -> dict[str, Any]:
    """Simulate a clinic network into daily export files and write its ground truth.

    Writes `export-YYYY-MM-DD.ndjson[.gz]` (one per day with events) into `out_dir` and the ground
    truth JSON to `truth_path` (default `<out_dir>/../simulation_truth.json`). `events_target`
    sizes the run by valid events instead of patients (within a few percent). Further keyword
    options are fields of `SimParams` (e.g. `outcome_interval=2`). Returns a summary dict.
    Byte-identical output for the same arguments.
    """
    if clinics < 1 or therapists_per_clinic < 1 or months < 1:
        raise ValueError("clinics, therapists_per_clinic and months must be at least 1")
    if not 0 <= bad_share < 0.5:
        raise ValueError(f"bad_share must be in [0, 0.5), got {bad_share}")
    if not -0.5 <= alliance_outcome_r <= 0.5:
        # (the latent-to-observed mapping is calibrated within +-0.5, within about 0.02; 0.7 came
        # out 0.735 and 0.9 capped at 0.80. Published correlations are about .28.)
        raise ValueError(f"alliance_outcome_r must be in [-0.5, 0.5] (the range the simulator is "
                         f"calibrated for; published alliance-outcome correlations are about .28), "
                         f"got {alliance_outcome_r}")
    unknown = set(options) - set(SimParams.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown simulator options: {sorted(unknown)}")
    t_start = time.perf_counter()
    params = SimParams(clinics=clinics, patients=patients, seed=seed, start=start, months=months,
                       therapists_per_clinic=therapists_per_clinic, gzip=gzip,
                       bad_share=bad_share, alliance_outcome_r=alliance_outcome_r,
                       events_target=events_target, **options)
    if events_target is not None:
        if events_target < 1:
            raise ValueError("events_target must be positive")
        params.patients = max(1, math.ceil(events_target / events_per_patient(params)))
    if params.patients < 1:
        raise ValueError("patients must be at least 1")
    for name in ("outcome_interval", "wai_interval"):
        if not isinstance(getattr(params, name), int) or getattr(params, name) < 1:
            raise ValueError(f"{name} must be a whole number of sessions, at least 1, "
                             f"got {getattr(params, name)!r}")
    out = Path(out_dir)
    truth_file = Path(truth_path) if truth_path is not None else default_truth_path(out)
    if out.resolve() == truth_file.resolve().parent or out.resolve() in truth_file.resolve().parents:
        raise ValueError(f"{truth_file}: the ground truth must not be written inside the landing "
                         "folder the ingest reads; choose another --truth path")
    sim = Simulator(params)
    writer = DayWriter(out, params.start, gzip_files=params.gzip)
    sim.run(writer)
    writer.close()
    truth = sim.truth
    files = {}
    for day, st in sorted(sim.file_stats.items()):
        name = writer.file_name(day)
        lines = writer.files[name]
        files[name] = {"lines": lines, **st,
                       "expected_accepted": lines - st["duplicates"] - st["quarantined"]}
    bad_by_kind: dict[str, int] = {k: 0 for k in BAD_KINDS}
    for b in truth["bad_records"]:
        bad_by_kind[b["kind"]] += 1
    doc = {
        "generator": "alliance.simulation",
        "parameters": params.as_json(),
        "window": {"start": params.start.isoformat(), "end_exclusive": sim.end_date.isoformat()},
        "totals": {
            "files": len(files), "lines": sum(f["lines"] for f in files.values()),
            "valid_events": sim.n_valid, "patients": params.patients,
            "episodes": sim.n_episodes, "bad_records": len(truth["bad_records"]),
            "bad_records_by_kind": bad_by_kind,
            "dropped_fields": sum(f["dropped_fields"] for f in files.values()),
        },
        "event_types": dict(sorted(truth["event_types"].items())),
        "files": files,
        "ruptures": truth["ruptures"],
        "sudden_gains": truth["sudden_gains"],
        "bad_records": truth["bad_records"],
        "amendments": truth["amendments"],
        "retractions": truth["retractions"],
        "wrong_totals": truth["wrong_totals"],
    }
    truth_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = truth_file.with_name(truth_file.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, truth_file)
    return {
        "out_dir": str(out), "truth_path": str(truth_file), "files": len(files),
        "lines": doc["totals"]["lines"], "events": sim.n_valid, "patients": params.patients,
        "episodes": sim.n_episodes, "bad_records": len(truth["bad_records"]),
        "ruptures": len(truth["ruptures"]), "sudden_gains": len(truth["sudden_gains"]),
        "seconds": round(time.perf_counter() - t_start, 2),
    }
