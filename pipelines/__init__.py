"""Config, engines, runners, cache, snapshots, scheduler and the CLI."""
