"""Side-by-side benchmarks of PostgreSQL direct, PgBouncer and pgdoorman (`python -m bench`)."""
