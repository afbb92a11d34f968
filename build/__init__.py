"""The orchestrator: the build pipeline, its gates, records and command line."""
