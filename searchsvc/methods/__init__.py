"""The search methods, one package each: its `search:` schema, its validate-time checks and its driver."""
