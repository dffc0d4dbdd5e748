"""Training jobs: records (store), processes (runner) and what the API shows of them (schemas)."""
