"""A plain dict backend (the test fixture of lmtier's third-party checks)."""
