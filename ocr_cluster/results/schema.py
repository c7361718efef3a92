"""The results row: one Parquet schema, versioned.

Rules for changing it: add columns at the end, never rename or retype one. Files written by an
older version simply lack the newer columns; readers fill them with nulls. Bump SCHEMA_VERSION
with every added column so a row says which columns its writer knew.

Metrics are percentages, as in the seeds' tables (mIoU 77.72, not 0.7772).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 5  # 2: skipped_samples; 3: total_time_s; 4: launcher, scheduler_job_id, restart_count; 5: iters_done

# completed: trained to the end; failed: gave up; stopped: ended early by the sweep's early stopping (ASHA),
# its miou the last evaluation's at iters_done; never counted as completed.
STATUSES = ("completed", "failed", "stopped")

UTC_US = pa.timestamp("us", tz="UTC")

SCHEMA = pa.schema([
    # identity of the run and of this attempt at it
    ("schema_version", pa.int16()),
    ("run_id", pa.string()),              # config.run_id: same config -> same id
    ("attempt", pa.int32()),              # retry number (SLURM requeue, resubmission); 0 for the first
    ("attempt_id", pa.string()),          # unique per written file, so no two writers share a key
    ("sweep", pa.string()),               # "" for a single job
    ("run_name", pa.string()),
    # the cell: what was trained
    ("dataset", pa.string()),
    ("method", pa.string()),              # display name of the head, e.g. "OCRNet"
    ("backbone", pa.string()),            # ocr_cluster.models.names.BACKBONES
    ("head", pa.string()),                # ocr_cluster.models.names.HEADS
    ("crop_size", pa.string()),           # "512x1024" (HxW)
    ("batch_size", pa.int32()),           # global batch
    ("iters", pa.int64()),
    ("seed", pa.int64()),
    # metrics, in percent
    ("miou", pa.float64()),
    ("miou_msflip", pa.float64()),
    ("aacc", pa.float64()),
    ("macc", pa.float64()),
    ("iou_per_class", pa.list_(pa.struct([("name", pa.string()), ("iou", pa.float64())]))),
    # cost
    ("mem_gb", pa.float64()),             # peak torch.cuda.max_memory_allocated in training
    ("fps", pa.float64()),                # inference images/s, batch 1
    ("train_time_s", pa.float64()),       # this attempt's training time (the whole run's is total_time_s)
    ("gpu_hours", pa.float64()),          # total_time_s (train_time_s before version 3) x num_gpus; null on CPU
    ("num_nodes", pa.int32()),
    ("num_gpus", pa.int32()),
    ("device", pa.string()),              # e.g. "NVIDIA H100 80GB HBM3" or "cpu"
    # outcome
    ("status", pa.string()),              # STATUSES
    ("error", pa.string()),
    ("checkpoint_uri", pa.string()),
    # provenance
    ("config_yaml", pa.string()),
    ("git_sha", pa.string()),
    ("ocr_cluster_version", pa.string()),
    ("torch_version", pa.string()),
    ("ray_version", pa.string()),
    ("started_at", UTC_US),               # the run's first attempt's training start (before version 3: this attempt's)
    ("finished_at", UTC_US),
    ("written_at", UTC_US),
    # data (version 2)
    ("skipped_samples", pa.int64()),      # bad samples skipped (data.skip_bad_samples), each counted once
    # run accounting (version 3)
    ("total_time_s", pa.float64()),       # training seconds over all attempts (train/clock.py): each attempt's up
                                          # to the checkpoint the next one resumed from, plus the last attempt's;
                                          # a crashed attempt's seconds after its last checkpoint are not known
    # how the attempt was launched (version 4)
    ("launcher", pa.string()),            # "slurm", "ray-job", "ray" (a driver that joins), "local"; null: unknown
    ("scheduler_job_id", pa.string()),    # e.g. the SLURM job id "1234_5" or the Ray job submission id
    ("restart_count", pa.int32()),        # scheduler requeues before this attempt (SLURM_RESTART_COUNT)
    # how far it trained (version 5)
    ("iters_done", pa.int64()),           # iterations trained when the row was written: iters for a completed
                                          # run, fewer for a stopped one (its miou is that iteration's eval)
], metadata={"ocr_cluster.schema_version": str(SCHEMA_VERSION)})

COLUMNS = tuple(SCHEMA.names)
REQUIRED = ("run_id", "dataset", "status")
PERCENT_COLUMNS = ("miou", "miou_msflip", "aacc", "macc")
