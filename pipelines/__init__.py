"""Orchestration: the long job, engines, runners, cache, snapshots, scheduler, experiments and the CLI."""
