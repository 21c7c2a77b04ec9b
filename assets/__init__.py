"""Dagster assets: ingest, seeds, SQL models, publish, reports, exports."""
