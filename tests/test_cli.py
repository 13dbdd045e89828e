"""CLI: info prints the devices; bad input gives one clear error line and exit code 2."""

import json

import jax
import pytest

from defuse_jax import cli


def test_info_lists_devices(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == jax.default_backend()
    assert len(info["devices"]) == jax.device_count() == 4  # conftest forces 4 CPU devices
    assert info["jax"] == jax.__version__


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train-classifier", "--dataset", "imagenet"], "Unknown dataset 'imagenet'"),
        (["train-vae", "--data-dir", "/no/such/dir"], "/no/such/dir"),
        (["train-classifier", "--batch-size", "5000", "--epochs", "1"], "batch_size 5000"),
    ],
)
def test_bad_input_is_one_clear_error(argv, message, capsys, tmp_path):
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_flags_map_onto_configs(tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args(
        ["train-vae", "--epochs", "3", "--no-progress", "--model-channels", "8", "16",
         "--max-train", "none", "--dataset", "mnist", "--data-seed", "4"]
    )  # fmt: skip
    train = cli.flags.from_flags(args, cli.TrainConfig)
    assert train.epochs == 3 and train.progress is False
    model = cli.flags.from_flags(args, cli.VAEConfig, prefix="model-")
    assert model.channels == (8, 16)
    data = cli.data_config(args)
    assert data.name == "mnist" and data.max_train is None and data.seed == 4
