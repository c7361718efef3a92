"""Tables in the seeds' format, published numbers, plots and the `results` command handlers."""

from __future__ import annotations

import argparse
import json

import pytest

from ocr_cluster import config
from ocr_cluster.models.names import BACKBONES, HEADS
from ocr_cluster.results import ResultsError, published, row_from_config, write_sweep_manifest, write_run
from ocr_cluster.results import commands

# Copied from the seeds (mmseg / openseg-group configs/ocrnet/README.md): the HRNet tables' header and
# rule, one HRNet row, and the ResNet tables' header.
SEED_HEADER = ("| Method |      Backbone      | Crop Size | Lr schd | Mem (GB) | Inf time (fps) | mIoU  "
               "| mIoU(ms+flip) |")
SEED_RULE = "|--------|--------------------|-----------|--------:|----------|----------------|------:|--------------:|"
SEED_W18_ROW = ("| OCRNet | HRNetV2p-W18       | 512x1024  |   40000 |      4.7 |           7.50 | 77.72 "
                "|         79.49 |")
SEED_RESNET_HEADER = ("| Method |      Backbone      | Crop Size | Batch Size | Lr schd | Mem (GB) | Inf time (fps) "
                      "| mIoU  | mIoU(ms+flip)|")


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def right_aligned(rule: str) -> list[bool]:
    return [c.endswith(":") for c in cells(rule)]


def cfg(backbone="hrnetv2_w18", head="ocr", iters=40000, batch=8, dataset="cityscapes", crop="512x1024", **more):
    sets = [f"model.backbone={backbone}", f"model.head={head}", f"schedule.iters={iters}",
            f"data.batch_size={batch}", f"data.dataset={dataset}", f"data.crop_size={crop}"]
    return config.load(None, sets + [f"{k}={v}" for k, v in more.items()])


def run(store, c, **metrics) -> dict:
    row = row_from_config(c, status=metrics.pop("status", "completed"), **metrics)
    write_run(store, row)
    return row


def parse(action: str, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"ocr-cluster results {action}")
    commands.add_arguments(action, parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def store(tmp_path):
    path = str(tmp_path / "store")
    run(path, cfg(), miou=77.72, miou_msflip=79.49, mem_gb=4.7, fps=7.5)
    run(path, cfg("hrnetv2_w48"), miou=80.0)
    run(path, cfg("hrnetv2_w48", iters=80000), miou=80.9)
    run(path, cfg("resnet101_d8", batch=16), miou=80.5)
    run(path, cfg("hrnetv2_w18_small"), status="failed", error="RuntimeError: CUDA out of memory")
    return path


# ---------------------------------------------------------------------------------------------
# the seeds' layout


def test_markdown_matches_the_seeds_header_rule_and_row(tmp_path, capsys):
    path = str(tmp_path)
    run(path, cfg(), miou=77.72, miou_msflip=79.49, mem_gb=4.7, fps=7.5)
    assert commands.cmd_table(parse("table", "--store", path)) == 0
    header, rule, row = capsys.readouterr().out.splitlines()
    assert cells(header) == cells(SEED_HEADER)
    assert right_aligned(rule) == right_aligned(SEED_RULE)
    assert cells(row) == cells(SEED_W18_ROW)


def test_batch_size_column_as_in_the_seeds_resnet_tables(store, capsys):
    assert commands.cmd_table(parse("table", "--store", store)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert cells(lines[0]) == cells(SEED_RESNET_HEADER)  # batch sizes 8 and 16 in one table
    body = [cells(line) for line in lines[2:]]
    assert [r[1] for r in body] == ["HRNetV2p-W18", "HRNetV2p-W48", "R-101-D8", "HRNetV2p-W48"]  # iters, zoo order
    assert body[2][3] == "16" and body[0][7] == "77.72" and body[1][5] == "-"  # no mem for that run: '-'


def test_failed_runs_only_on_request(store, capsys):
    commands.cmd_table(parse("table", "--store", store, "--format", "json"))
    assert {r["status"] for r in json.loads(capsys.readouterr().out)} == {"completed"}
    commands.cmd_table(parse("table", "--store", store, "--format", "json", "--include-failed"))
    assert len(json.loads(capsys.readouterr().out)) == 5


def test_one_section_per_dataset(tmp_path, capsys):
    path = str(tmp_path)
    run(path, cfg(), miou=77.0)
    run(path, cfg(dataset="ade20k", crop="512x512", iters=80000, batch=16), miou=37.9)
    commands.cmd_table(parse("table", "--store", path))
    out = capsys.readouterr().out
    assert out.index("### ADE20K") < out.index("### Cityscapes")
    commands.cmd_table(parse("table", "--store", path, "--dataset", "ade20k"))
    assert "###" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# published numbers


def test_compare_published_shows_mmseg_77_72_beside_ours(tmp_path, capsys):
    path = str(tmp_path)
    run(path, cfg(), miou=78.01, miou_msflip=79.20)  # hrnetv2_w18 + ocr, cityscapes, 512x1024, 40k
    assert commands.cmd_table(parse("table", "--store", path, "--compare-published")) == 0
    lines = capsys.readouterr().out.splitlines()
    header, row = cells(lines[0]), cells(lines[2])
    got = dict(zip(header, row))
    assert header[:8] == cells(SEED_HEADER)
    assert (got["mIoU"], got["Published mIoU"], got["Δ mIoU"]) == ("78.01", "77.72", "+0.29")
    assert (got["Published mIoU(ms+flip)"], got["Δ mIoU(ms+flip)"], got["Source"]) == ("79.49", "-0.29", "mmseg")
    assert "- Source mmseg: open-mmlab/mmsegmentation:configs/ocrnet/README.md" in "\n".join(lines)
    commands.cmd_table(parse("table", "--store", path, "--compare-published", "--format", "json"))
    (rec,) = json.loads(capsys.readouterr().out)
    assert rec["published_miou"] == [77.72] and rec["delta_miou"] == pytest.approx(0.29)


def test_repeated_published_runs_are_compared_by_their_mean(tmp_path, capsys):
    path = str(tmp_path)
    run(path, cfg("resnet101_d8", head="ocrplus_sepconv", batch=16), miou=80.50)
    commands.cmd_table(parse("table", "--store", path, "--compare-published"))
    got = dict(zip(*(cells(line) for line in capsys.readouterr().out.splitlines()[0:3:2])))
    assert got["Method"] == "OCRNetPlus (OCR & Decoder w/ SepDepthWiseConv)"
    assert got["Published mIoU"] == "80.45 (mean of 3)" and got["Δ mIoU"] == "+0.05"  # 80.91, 80.36, 80.08
    assert got["Source"] == "openseg-mmseg"


def test_no_match_without_the_same_setting():
    base = {"dataset": "cityscapes", "head": "ocr", "backbone": "hrnetv2_w18", "crop_size": "512x1024",
            "iters": 40000, "batch_size": 8}
    assert published.find(base)["miou"] == [77.72]
    for change in ({"iters": 30000}, {"crop_size": "769x769"}, {"head": "fcn"}, {"dataset": "ade20k"}):
        assert published.find(base | change) is None, change
    r101 = base | {"backbone": "resnet101_d8"}
    assert published.find(r101)["miou"] == [80.09]
    assert published.find(r101 | {"batch_size": 16})["miou"] == [80.30]
    assert published.find(r101 | {"batch_size": 4}) is None  # the source gives a batch; 4 is not it


def test_published_data_is_complete_and_sourced():
    rows = published.load()
    assert len(rows) > 100
    for row in rows:
        assert row["source"] and row["reference"] and row["dataset"] in config.DATASETS, row
        assert row["miou"] or row["miou_msflip"], row
        assert row["head"] is None or row["head"] in HEADS, row
        assert row["split"] in ("val", "test"), row
        assert (row["iters"] is None) or (row["epochs"] is None), row
        if row["head"] and not row["variant"] and row["iters"]:
            assert row["backbone"] in BACKBONES, row
    by_source = {row["source"] for row in rows}
    assert by_source == {"mmseg", "mmseg-0.x", "openseg-mmseg", "openseg", "HRNet-OCR", "sssegmentation", "OCNet"}

    def one(**key):
        (hit,) = [r for r in rows if all(r[k] == v for k, v in key.items())]
        return hit

    w48 = one(source="mmseg", dataset="cityscapes", backbone="hrnetv2_w48", iters=40000)
    assert (w48["miou"], w48["miou_msflip"], w48["mem_gb"], w48["fps"]) == ([80.58], [81.79], 8.0, 4.22)
    assert one(source="mmseg", dataset="ade20k", backbone="hrnetv2_w48", iters=80000)["miou"] == [43.00]
    assert one(source="mmseg", dataset="voc-aug", backbone="hrnetv2_w18_small", iters=20000)["miou"] == [71.70]
    assert one(source="mmseg-0.x", backbone="hrnetv2_w18_small")["miou"] == [74.30]
    assert one(source="sssegmentation", dataset="cityscapes", backbone="hrnetv2_w48")["epochs"] == 440


# ---------------------------------------------------------------------------------------------
# pivots, formats, show, plot, reconcile through the handlers


def test_pivot_rows_by_cols(store, capsys):
    run(store, cfg("hrnetv2_w48", iters=80000, **{"run.seed": 1}), miou=81.1)
    commands.cmd_table(parse("table", "--store", store, "--rows", "backbone,head", "--cols", "iters"))
    lines = capsys.readouterr().out.splitlines()
    assert cells(lines[0]) == ["Backbone", "Method", "40000", "80000"]
    assert [cells(line) for line in lines[2:]] == [
        ["HRNetV2p-W18", "OCRNet", "77.72", "-"],
        ["HRNetV2p-W48", "OCRNet", "80.00", "81.00 (n=2)"],
        ["R-101-D8", "OCRNet", "80.50", "-"],
    ]
    commands.cmd_table(parse("table", "--store", store, "--rows", "backbone", "--cols", "iters", "--agg", "max",
                             "--format", "csv"))
    assert capsys.readouterr().out.splitlines() == ["backbone,40000,80000", "hrnetv2_w18,77.72,",
                                                    "hrnetv2_w48,80.0,81.1", "resnet101_d8,80.5,"]


def test_where_filters_and_csv(store, capsys):
    commands.cmd_table(parse("table", "--store", store, "--where", "iters=40000", "--where",
                             "backbone=hrnetv2_w18,resnet101_d8", "--format", "csv"))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("run_id,dataset,sweep,method,backbone,head,crop_size,batch_size,iters")
    assert sorted(line.split(",")[4] for line in out[1:]) == ["hrnetv2_w18", "resnet101_d8"]


@pytest.mark.parametrize("argv, message", [
    (["--where", "iters=forty"], "--where iters: expected a number"),
    (["--where", "nosuch=1"], "bad --where 'nosuch=1'"),
    (["--cols", "iters", "--compare-published"], "--compare-published needs the seeds' layout"),
    (["--cols", "iterz"], r"--cols: unknown field\(s\) iterz"),
])
def test_bad_table_arguments_are_one_line_errors(store, argv, message):
    with pytest.raises(ResultsError, match=message):
        commands.cmd_table(parse("table", "--store", store, *argv))


def test_show_run_in_full(tmp_path, capsys):
    path = str(tmp_path)
    row = run(path, cfg(), status="failed", error="Traceback\nRuntimeError: NCCL timeout", attempt=0)
    run(path, cfg(), miou=77.9, iou_per_class={"road": 98.1, "sidewalk": 84.0}, attempt=1)
    assert commands.cmd_show(parse("show", row["run_id"][:6], "--store", path)) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {row['run_id']}: OCRNet HRNetV2p-W18 cityscapes 512x1024 40000 iters (completed)")
    assert "| road     | 98.10 |" in out and "## Attempts (2)" in out and "| failed " in out
    assert "```yaml\nrun:\n" in out and "backbone: hrnetv2_w18" in out
    commands.cmd_show(parse("show", row["run_id"], "--store", path, "--format", "json"))
    shown = json.loads(capsys.readouterr().out)
    assert shown["run"]["miou"] == 77.9 and [a["status"] for a in shown["attempts"]] == ["failed", "completed"]
    with pytest.raises(ResultsError, match="no run 'rnope'"):
        commands.cmd_show(parse("show", "rnope", "--store", path))
    run(path, cfg("hrnetv2_w48"), miou=80.0)
    with pytest.raises(ResultsError, match="ambiguous"):
        commands.cmd_show(parse("show", "r", "--store", path))


def test_plot_writes_an_image(store, tmp_path, capsys):
    out = tmp_path / "plots" / "miou.png"
    assert commands.cmd_plot(parse("plot", "--store", store, "--x", "iters", "--y", "miou", "--by", "backbone",
                                   "--out", str(out))) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    svg = tmp_path / "crop.svg"  # a categorical x axis
    commands.cmd_plot(parse("plot", "--store", store, "--x", "crop_size", "--out", str(svg)))
    assert "<svg" in svg.read_text()
    with pytest.raises(ResultsError, match="no runs have both"):
        commands.cmd_plot(parse("plot", "--store", store, "--y", "aacc", "--out", str(out)))


def test_reconcile_handler_exit_codes(tmp_path, capsys):
    path = str(tmp_path)
    a, b = cfg(**{"run.sweep": "g"}), cfg("hrnetv2_w48", **{"run.sweep": "g"})
    run(path, a, miou=77.0)
    write_sweep_manifest(path, "g", [a.run_id, b.run_id])
    assert commands.cmd_reconcile(parse("reconcile", "--store", path, "--sweep", "g")) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "sweep g: 1/2 completed, 1 missing, 0 failed, 0 duplicated, 0 not in the manifest"
    assert out[1] == f"missing     {b.run_id}"
    run(path, b, status="failed", error="Traceback\nRuntimeError: NCCL timeout")
    assert commands.cmd_reconcile(parse("reconcile", "--store", path, "--sweep", "g")) == 1
    assert f"failed      {b.run_id}  attempt 0: RuntimeError: NCCL timeout" in capsys.readouterr().out
    run(path, b, miou=80.0, attempt=1)
    assert commands.cmd_reconcile(parse("reconcile", "--store", path, "--sweep", "g", "--format", "json")) == 0
    assert json.loads(capsys.readouterr().out)["complete"] is True


def test_compact_handler(store, capsys):
    assert commands.cmd_compact(parse("compact", "--store", store)) == 0
    assert capsys.readouterr().out.startswith("wrote ")
