"""`python -m ingest`: every accepted position and presence change into the SQL history."""
