"""Sharded datasets: Parquet shards, converters, transforms, Ray Data pipeline."""
