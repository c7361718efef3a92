"""The `ocr-cluster` entry point and `python -m ocr_cluster.train`, run as a user runs them."""

from __future__ import annotations

import pytest

from ocr_cluster import config

VERBS = ("train", "eval", "sweep", "results", "data", "models")


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert "Traceback" not in text
    return lines[0]


def test_help_lists_every_verb(cli):
    result = cli("--help")
    assert result.returncode == 0
    for verb in VERBS:
        assert f"\n    {verb} " in result.stdout


@pytest.mark.parametrize("args", [[v, "--help"] for v in VERBS] + [
    ["sweep", "launch", "--help"], ["results", "table", "--help"], ["data", "synth", "--help"],
    ["models", "list", "--help"]])
def test_every_verb_has_help(cli, args):
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ocr-cluster")


def test_missing_config_file_is_one_line(cli):
    result = cli("train", "/no/such.yaml")
    assert result.returncode == 2
    assert one_line(result.stderr) == "ocr-cluster train: error: config file not found: /no/such.yaml"
    assert result.stdout == ""


def test_typo_key_is_one_line_naming_key_and_choices(cli, tmp_path):
    job = tmp_path / "typo.yaml"
    job.write_text("model:\n  backbon: hrnetv2_w48\n")
    for result in (cli("train", str(job)), cli(str(job), module="ocr_cluster.train")):
        assert result.returncode == 2
        line = one_line(result.stderr)
        assert "unknown key 'model.backbon' (did you mean 'backbone'?)" in line
        assert "valid keys here: backbone, head" in line


def test_bad_override_is_one_line(cli):
    result = cli("train", "--set", "model.backbone=hrnet_w48")
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "model.backbone: unknown value 'hrnet_w48'" in line and "hrnetv2_w48" in line


def test_unknown_verb_and_missing_argument_are_one_line(cli):
    for args in (["fly"], ["data", "synth"], ["results"]):
        result = cli(*args)
        assert result.returncode == 2, args
        assert one_line(result.stderr).startswith("ocr-cluster")


@pytest.mark.parametrize("args", [["sweep", "launch", "g.yaml"]])
def test_verbs_not_landed_say_so(cli, args):
    """Until a capability lands its verb must say so and fail (drop it from this list when it lands)."""
    result = cli(*args)
    assert result.returncode == 3
    assert "has not landed yet" in one_line(result.stderr)


def test_print_config_round_trips(cli, tmp_path):
    result = cli("train", "--set", "model.backbone=hrnetv2_w48", "--set", "data.batch_size=16", "--print-config")
    assert result.returncode == 0, result.stderr
    first, _, body = result.stdout.partition("\n")
    cfg = config.loads_yaml(body)
    assert cfg.model.backbone == "hrnetv2_w48" and cfg.data.batch_size == 16
    assert first == f"# run_id: {cfg.run_id}"
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(result.stdout)
    assert cli("train", str(dumped), "--print-run-id").stdout.strip() == cfg.run_id


def test_debug_shows_the_traceback(cli):
    result = cli("train", "/no/such.yaml", "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_results_table_compares_with_published(cli, tmp_path):
    """The results issue's done-when: mmseg's 77.72 beside our hrnetv2_w18 / ocr / cityscapes 40k run."""
    from ocr_cluster.results import row_from_config, write_run

    cfg = config.load(overrides=["model.backbone=hrnetv2_w18", "model.head=ocr", "data.dataset=cityscapes",
                                 "data.crop_size=512x1024", "schedule.iters=40000", "data.batch_size=8"])
    write_run(str(tmp_path), row_from_config(cfg, status="completed", miou=77.10, aacc=95.0, macc=84.0))
    result = cli("results", "table", "--store", str(tmp_path), "--compare-published")
    assert result.returncode == 0, result.stderr
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in result.stdout.splitlines() if line.startswith("|")]
    header = rows[0]
    assert header[:8] == ["Method", "Backbone", "Crop Size", "Lr schd", "Mem (GB)", "Inf time (fps)", "mIoU",
                          "mIoU(ms+flip)"]
    ours = dict(zip(header, next(r for r in rows if "HRNetV2p-W18" in r)))
    assert ours["mIoU"] == "77.10" and ours["Published mIoU"] == "77.72" and ours["Δ mIoU"] == "-0.62"


def test_results_bad_input_is_one_line(cli, tmp_path):
    result = cli("results", "show", "nope", "--store", str(tmp_path))
    assert result.returncode == 2
    assert "no run 'nope'" in one_line(result.stderr)


def test_models_info_reports_mmseg_param_count(cli):
    result = cli("models", "info", "--backbone", "hrnetv2_w48", "--head", "ocr", "--num-classes", "19", "--json")
    assert result.returncode == 0, result.stderr
    assert "70371446" in result.stdout.replace(",", "")


def test_models_unknown_backbone_is_one_line(cli):
    result = cli("models", "info", "--backbone", "hrnet48", "--head", "ocr")
    assert result.returncode == 2
    assert "valid: hrnetv2_w18_small" in one_line(result.stderr)


def test_models_convert_mmseg_checkpoint(cli, tmp_path):
    import torch

    from ocr_cluster.models import build_model, load_checkpoint

    model = build_model("hrnetv2_w18_small", "fcn", num_classes=5)
    src = tmp_path / "mmseg.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"note": "mmseg-style"}}, src)
    dst = tmp_path / "ours.pt"
    result = cli("models", "convert", str(src), str(dst), "--backbone", "hrnetv2_w18_small", "--head", "fcn",
                 "--num-classes", "5")
    assert result.returncode == 0, result.stderr
    assert "(mmseg)" in result.stdout
    fresh = build_model("hrnetv2_w18_small", "fcn", num_classes=5)
    load_checkpoint(fresh, str(dst))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    wrong = cli("models", "convert", str(src), str(tmp_path / "x.pt"), "--backbone", "hrnetv2_w18_small",
                "--head", "fcn", "--num-classes", "7")
    assert wrong.returncode == 2 and not (tmp_path / "x.pt").exists()
    assert "mis" in one_line(wrong.stderr).lower()
