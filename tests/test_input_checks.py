"""The pieces behind 'bad input ends a run at once': preflight's shard-size and checkpoint checks, and the
one line taken out of what Ray wraps around a worker's error (tests/test_input_errors.py runs them on the
real services)."""

from __future__ import annotations

import io
import os

import pytest
import torch

from ocr_cluster import storage
from ocr_cluster.data import DataError
from ocr_cluster.data.errors import DataUnreachable
from ocr_cluster.data.shards import check_shard_sizes, read_manifest
from ocr_cluster.data.synth import SynthSpec, write_synthetic
from ocr_cluster.models import build_model
from ocr_cluster.models.convert import NOT_LOADABLE, CheckpointError, check_checkpoint, load_checkpoint
from ocr_cluster.train.input_errors import (InputRejected, WorkerInputError, bad_input_line, clean_line,
                                            input_error_line)

SPEC = SynthSpec(classes=4, num_train=6, num_val=2, size_hw=(32, 32))


def test_shard_sizes_are_checked_against_the_manifest(tmp_path):
    manifest = write_synthetic(str(tmp_path / "ds"), SPEC, shard_mb=0.005)
    assert len(manifest.split("train").shards) > 1
    check_shard_sizes(read_manifest(str(tmp_path / "ds")))  # all there, all the right size

    shard = manifest.split("train").shards[1]
    path = tmp_path / "ds" / shard.path
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"shard .*{shard.path} is truncated: 100 bytes, the manifest says "
                                        rf"{shard.num_bytes}$"):
        check_shard_sizes(read_manifest(str(tmp_path / "ds")))
    path.unlink()
    with pytest.raises(DataError, match=rf"shard .*{shard.path} is listed in the manifest but missing"):
        check_shard_sizes(read_manifest(str(tmp_path / "ds")))


@pytest.mark.s3
def test_shard_sizes_on_s3(s3):
    uri = s3.url("sizes")
    manifest = write_synthetic(uri, SPEC)
    check_shard_sizes(read_manifest(uri))
    shard = manifest.split("val").shards[0]
    storage.write_bytes_atomic(storage.join(uri, shard.path), b"x" * (shard.num_bytes + 5))
    with pytest.raises(DataError, match="is longer than the manifest says"):
        check_shard_sizes(read_manifest(uri))


@pytest.fixture(scope="module")
def meta_model():
    with torch.device("meta"):
        return build_model("hrnetv2_w18_small", "ocr", 4)


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("content, reason", [
    (os.urandom(2048), "neither a zip archive nor a pickle"),
    (b"PK\x03\x04" + os.urandom(200), "failed reading zip archive"),
    (_saved({"encoder.weight": torch.zeros(2)}), "none of its keys [encoder.weight] is a weight of the model"),
    (_saved({"args": io.StringIO}), "Unsupported global")])
def test_what_is_no_loadable_checkpoint_is_one_line_without_torch_advice(tmp_path, meta_model, content, reason):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    for backbone_only in (False, True):
        with pytest.raises(CheckpointError) as info:
            check_checkpoint(meta_model, str(path), backbone_only=backbone_only)
        text = str(info.value)
        assert NOT_LOADABLE in text and reason in text and str(path) in text, text
        assert "\n" not in text and "False" not in text and "add_safe_globals" not in text, text


def test_a_checkpoint_that_fits_passes_the_check_and_loads(tmp_path, meta_model):
    model = build_model("hrnetv2_w18_small", "ocr", 4)
    torch.save({"state_dict": model.state_dict(), "meta": {}}, tmp_path / "mmseg.pth")
    assert check_checkpoint(meta_model, str(tmp_path / "mmseg.pth")) == "mmseg"
    assert check_checkpoint(meta_model, str(tmp_path / "mmseg.pth"), backbone_only=True) == "mmseg"
    assert next(meta_model.parameters()).device.type == "meta"  # checked, nothing copied
    assert load_checkpoint(build_model("hrnetv2_w18_small", "ocr", 4), str(tmp_path / "mmseg.pth")).format == "mmseg"
    # Another number of classes: the check names the mis-shaped weights, as the load would.
    torch.save(build_model("hrnetv2_w18_small", "ocr", 7).state_dict(), tmp_path / "seven.pth")
    with pytest.raises(CheckpointError, match="4 mis-shaped"):
        check_checkpoint(meta_model, str(tmp_path / "seven.pth"))


def _raised(exc: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        raise exc from cause
    except BaseException as caught:  # noqa: BLE001 - we want it with its chain
        return caught


def test_the_line_is_found_through_ray_data_and_ray_core_wrappers():
    from ray.exceptions import RayTaskError, UserCodeException

    line = "shard s3://b/d/train/part-00000.parquet: sample 'k': label has values outside [0, 4) and 255: 9"
    annotated = DataError(f"{line}\nFailed to apply UDF transform after 1/1 attempts.\nTo change retry attempts...")
    udf = _raised(UserCodeException("UDF failed to process a data block."), annotated)
    remote = RayTaskError("map_batches", "Traceback...\n\x1b[36m(pid=1)\x1b[0m ...", udf).as_instanceof_cause()
    assert bad_input_line(_raised(RuntimeError("iterating failed"), remote)) == line
    assert bad_input_line(_raised(RuntimeError("the loss became nan"))) is None
    # Across processes __cause__ is lost: the line is read from the remote traceback text.
    text = (f"\x1b[36mray::MapBatches(_train_batch)()\x1b[39m\n  File \"transforms.py\", line 122\n"
            f"ocr_cluster.data.errors.DataError: {line}\n\nThe above exception was the direct cause of the "
            "following exception:\n\nray.exceptions.UserCodeException: UDF failed to process a data block.")
    remote = RayTaskError("get", text, UserCodeException("UDF failed")).as_instanceof_cause()
    assert bad_input_line(remote) == line
    assert bad_input_line(RayTaskError("get", text.replace("DataError", "DataUnreachable"),
                                       UserCodeException("x")).as_instanceof_cause()) is None
    assert bad_input_line(RayTaskError("get", text.replace("data.errors.DataError", "data.errors.NoSuch"),
                                       UserCodeException("x")).as_instanceof_cause()) is None
    # Data that could not be reached may come back: not final.
    assert bad_input_line(_raised(DataUnreachable("cannot read the dataset at s3://b/d: EndpointError"))) is None
    # CheckpointError counts too; a store error does not.
    assert bad_input_line(CheckpointError("cannot read checkpoint x: nope")) == "cannot read checkpoint x: nope"
    from ocr_cluster.results.errors import ResultsError
    assert bad_input_line(ResultsError("store down")) is None


def test_the_line_is_found_in_what_ray_train_raises_or_reports():
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    line = "shard s3://b/d/train/part-00000.parquet: sample 'k': label has values outside [0, 4) and 255: 9"
    assert input_error_line(ControllerError(InputRejected(line))) == line
    reported = UserExceptionWithTraceback(
        WorkerInputError(line), f"Traceback (most recent call last):\n  ...\nocr_cluster.train.input_errors."
                                f"WorkerInputError: {line}\n")
    assert input_error_line(WorkerGroupError("worker 0 failed", {0: reported})) == line
    # The worker's traceback text alone is enough (what a worker reported, as Ray pickles it).
    assert input_error_line(RuntimeError(str(reported))) == line
    assert input_error_line(WorkerGroupError("x", {0: RuntimeError("CUDA out of memory")})) is None
    assert clean_line("\x1b[31merror\x1b[39m: bad\nmore") == "error: bad"


def test_the_train_function_turns_bad_input_into_one_final_error():
    from ocr_cluster.train.input_errors import bad_input_ends_the_run

    with pytest.raises(WorkerInputError, match=r"^shard x: sample 'k': bad$") as info:
        with bad_input_ends_the_run():
            raise RuntimeError("iterating failed") from DataError("shard x: sample 'k': bad\nTo change retry...")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(RuntimeError, match="CUDA"):  # anything else: Ray Train's to retry
        with bad_input_ends_the_run():
            raise RuntimeError("CUDA error")
