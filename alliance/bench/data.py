"""Benchmark data sets: simulated landing folders cached per size, plus the 1% follow-up file.

Layout under the data directory (`<data>/bench/<n>/`):
`landing/` (the simulator's daily exports), `simulation_truth.json`, `dataset.json` (written
last: its presence marks a complete, reusable data set), `increment/export-followup-*.ndjson`
(the incremental scenario's extra file) and `work/` (scratch warehouses, wiped per run).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from alliance.ingest import landing_files

DEFAULT_SEED = 42
DEFAULT_MONTHS = 18  # the simulator's default window: one export file per day
# The follow-up file reuses the simulator with another seed (new event_ids); its patient, episode
# and session identifiers get an "F<seed>-" prefix so they never collide with the base data set's
# (nor with another seed's follow-up applied to the same warehouse).
FOLLOWUP_SEED_OFFSET = 1000
FOLLOWUP_ID_PREFIXES = ('"PAT-', '"EPI-', '"SES-')


def dataset_dir(data_root: Path, events: int) -> Path:
    """`<data>/bench/<events>`: everything the benchmark keeps for one size."""
    return Path(data_root) / "bench" / str(int(events))


def build_dataset(data_root: Path, events: int, *, seed: int = DEFAULT_SEED,
                  months: int = DEFAULT_MONTHS, log=print) -> dict[str, Any]:
    """Simulate about `events` valid events into `<data>/bench/<n>/landing`, or reuse them.

    A data set is reused only when its `dataset.json` marker matches size and seed and every
    file it lists is still there; otherwise the folder is rebuilt from scratch.
    """
    from alliance.simulator import simulate

    root = dataset_dir(data_root, events)
    landing = root / "landing"
    marker = root / "dataset.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if (info.get("events_target") == int(events) and info.get("seed") == seed
                and info.get("months", DEFAULT_MONTHS) == months
                and landing.is_dir() and len(landing_files(landing)) == info["summary"]["files"]):
            log(f"reusing data set {landing} ({info['summary']['lines']:,} lines)")
            return {**info, "reused": True, "landing": str(landing)}
    if landing.exists():
        shutil.rmtree(landing)
    marker.unlink(missing_ok=True)
    shutil.rmtree(root / "increment", ignore_errors=True)  # it belonged to the old data set
    log(f"simulating about {events:,} events into {landing} ...")
    summary = simulate(landing, seed=seed, events_target=int(events), months=months,
                       truth_path=root / "simulation_truth.json")
    info = {"events_target": int(events), "seed": seed, "months": months, "summary": summary}
    marker.write_text(json.dumps(info, indent=1) + "\n")
    return {**info, "reused": False, "landing": str(landing)}


def followup_file(data_root: Path, events: int, *, seed: int = DEFAULT_SEED,
                  months: int = DEFAULT_MONTHS, share: float = 0.01, log=print) -> Path:
    """One extra export file holding about `share` x `events` new events (cached).

    Simulated with a different seed, so every event_id is new; the days' files are concatenated
    into one `export-followup-f<seed>.ndjson`, as a producer sending a catch-up export would.
    """
    from alliance.simulator import simulate

    out_dir = dataset_dir(data_root, events) / "increment"
    fseed = seed + FOLLOWUP_SEED_OFFSET
    target = out_dir / f"export-followup-f{fseed}.ndjson"  # f: ids prefixed F<seed>-
    if target.exists():
        return target
    n = max(1, round(events * share))
    log(f"simulating the follow-up file (about {n:,} events, seed {fseed}) ...")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="alliance-bench-", dir=out_dir) as tmp:
        sim_out = Path(tmp) / "landing"
        simulate(sim_out, seed=fseed, events_target=n, months=months,
                 truth_path=Path(tmp) / "truth.json")
        partial = out_dir / f".{target.name}.partial"
        with open(partial, "w", encoding="utf-8") as dst:
            for f in landing_files(sim_out):
                text = f.read_text(encoding="utf-8")
                for p in FOLLOWUP_ID_PREFIXES:
                    # the seed in the prefix keeps follow-ups of different seeds apart too
                    text = text.replace(p, f"{p}F{fseed}-")
                dst.write(text if text.endswith("\n") or not text else text + "\n")
        partial.replace(target)
    return target


def count_lines(path: Path) -> int:
    """Non-empty lines of a plain NDJSON file."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())
