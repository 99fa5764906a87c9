"""Command-line options are generated from the config dataclasses: every field is an option,
with the dataclass's default, and shared options are one definition."""

from __future__ import annotations

from dataclasses import fields

import click
import pytest
from click.testing import CliRunner

from deepfusion.backbones import BACKBONES
from deepfusion.cli import main
from deepfusion.config import FeatureConfig, ModelConfig, RuntimeConfig, TrainConfig
from deepfusion.options import Opt, config_options, take

#: Fields whose option defaults to None ("auto": the stage resolves them)
AUTO = {"epochs", "batch_size", "lr", "patience", "backbone", "fmax", "chroma_tuning"}


def _params(command: str) -> dict[str, click.Parameter]:
    return {p.name: p for p in main.commands[command].params}


@pytest.mark.parametrize("command, classes", [
    ("train", (TrainConfig, RuntimeConfig)),
    ("extract", (FeatureConfig,)),
])
def test_every_config_field_is_an_option_with_the_dataclass_default(command, classes):
    params = _params(command)
    for cls in classes:
        for f in fields(cls):
            assert f.name in params, f"{cls.__name__}.{f.name} has no option on {command}"
            expected = None if f.name in AUTO else f.default
            assert params[f.name].default == expected, f.name


def test_model_options_of_train_follow_model_config():
    params = _params("train")
    for name in ("backbone", "share_backbone", "band_stats"):
        expected = None if name in AUTO else ModelConfig.__dataclass_fields__[name].default
        assert params[name].default == expected, name
    assert tuple(params["backbone"].type.choices) == tuple(BACKBONES)


@pytest.mark.parametrize("option", ["device", "checkpoint", "split_file", "quiet", "cache_dir",
                                    "jobs", "timeout"])
def test_shared_options_are_one_definition(option):
    users = {name: _params(name)[option] for name in main.commands if option in _params(name)}
    assert len(users) >= 2, users
    helps = {p.help for p in users.values()}
    defaults = {str(p.default) for p in users.values()}
    assert len(helps) == 1 and len(defaults) == 1, users


def test_generated_options_parse_into_the_config():
    @click.command()
    @config_options(TrainConfig, [Opt("lr", type=click.FloatRange(min=0, min_open=True)),
                                  Opt("select"), Opt("seed")])
    @config_options(RuntimeConfig, [Opt("amp"), Opt("device")])
    def cmd(**kwargs):
        cfg, rt = take(TrainConfig, kwargs), take(RuntimeConfig, kwargs)
        assert not kwargs
        click.echo(f"{cfg.lr} {cfg.select} {cfg.seed} {rt.amp} {rt.device}")

    runner = CliRunner()
    out = runner.invoke(cmd, ["--lr", "0.01", "--select", "val_acc", "--no-amp"]).output
    assert out.split() == ["0.01", "val_acc", "0", "False", "auto"]
    assert runner.invoke(cmd, []).output.split() == ["None", "last", "0", "True", "auto"]
    assert runner.invoke(cmd, ["--lr", "0"]).exit_code == 2          # the range is checked
