"""Results store: one Parquet file per run attempt, tables, plots, published numbers."""
