"""Results store: one Parquet file per run attempt, tables in the seeds' format, plots, published numbers.

    from ocr_cluster.results import row_from_config, write_run, read_runs
    write_run(cfg.results.store_uri, row_from_config(cfg, status="completed", miou=77.72, mem_gb=4.7))
    read_runs("s3://bucket/results", dataset="cityscapes")   # pyarrow Table, one row per run_id
"""

from ocr_cluster.results.errors import ResultsError
from ocr_cluster.results.rows import RowError, row_from_config, scrub
from ocr_cluster.results.schema import SCHEMA, SCHEMA_VERSION
from ocr_cluster.results.store import (UnreadableFileWarning, compact, latest, list_run_files, read_attempts, read_runs,
                                       sweep_manifest_uri, write_run, write_sweep_manifest)

__all__ = ["SCHEMA", "SCHEMA_VERSION", "ResultsError", "RowError", "UnreadableFileWarning", "compact", "latest",
           "list_run_files", "read_attempts", "read_runs", "row_from_config", "scrub", "sweep_manifest_uri",
           "write_run", "write_sweep_manifest"]
