"""Activities: one module per job, each holding its client."""
