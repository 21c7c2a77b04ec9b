"""Dagster definitions, resources, jobs, schedules, sensors and the `alliance` CLI."""
