"""The flags every job shares become config values (dkd_ray.cli)."""

from __future__ import annotations

import argparse

import pytest
import torch

from dkd_ray.cli import add_common_args, config_from_args


def _config(*argv: str):
    return config_from_args(add_common_args(argparse.ArgumentParser()).parse_args(list(argv)))


def test_backbone_weights_flag_sets_both_trunks(tmp_path, capsys):
    real = ("--preset", "cuhk_sysu", "--dataset", "cuhk_sysu")
    default = _config(*real)
    assert default.teacher.backbone_weights == default.student.backbone_weights == "imagenet"  # the preset's

    scratch = _config(*real, "--backbone-weights", "none")
    assert scratch.teacher.backbone_weights == scratch.student.backbone_weights == "none"

    trunk = tmp_path / "trunk.pt"
    torch.save({}, trunk)
    from_file = _config("--backbone-weights", str(trunk))  # cpu-small: none unless told
    assert from_file.teacher.backbone_weights == from_file.student.backbone_weights == str(trunk.resolve())

    with pytest.raises(SystemExit) as exit_info:
        _config("--backbone-weights", str(tmp_path / "missing.pt"))
    assert exit_info.value.code == 2  # bad input: argparse's status, one line on stderr
    assert "missing.pt: no such file" in capsys.readouterr().err
