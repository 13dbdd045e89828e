"""CLI: info prints the devices; bad input gives one clear error line and exit code 2."""

import json
import os

import jax
import pytest

from defuse_jax import cli
from defuse_jax.pipeline import save_run_config
from defuse_jax.run_config import RunConfig


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
        (["train-classifier", "--clf-batch-size", "5000", "--clf-epochs", "1"], "batch_size 5000"),
    ],
)
def test_bad_input_is_one_clear_error(argv, message, capsys, tmp_path):
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "flags_, message",
    [
        (["--dataset", "mnst"], "Unknown dataset 'mnst'"),
        (["--data-dir", "/no/such/dir"], "/no/such/dir"),
        (["--val-fraction", "1.5"], "val_fraction must be in [0, 1)"),
        (["--eval-region-samples", "-1"], "region_samples=-1; it must be an integer >= 1"),
        (["--grid-samples", "0"], "grid_samples=0"),
        (["--clf-epochs", "0"], "epochs=0"),
        (["--correct-tau", "0"], "tau=0.0; it must be a number > 0"),
        (["--distill-n-components", "0"], "n_components=0; it must be an integer >= 1"),
        (["--distill-max-codes", "0"], "max_codes=0; it must be an integer >= 1 or None"),
        (["--correct-lams", "0.1", "0.2", "--no-correct-select"], "pass --correct-lam instead"),
        (["--search-scales", "0.5", "-1"], "search_scales (--search-scales): every scale must"),
        (["--search-scales", "1", "--search-mode", "iterative"], "does not use `scale`"),
    ],
)
def test_a_bad_flag_on_a_run_fails_before_anything_is_saved_or_set_aside(
    flags_, message, tmp_path, capsys
):
    out = str(tmp_path / "run")
    save_run_config(out, RunConfig())
    os.makedirs(os.path.join(out, "train"))
    with open(os.path.join(out, "train", "stage.json"), "w") as f:
        f.write("{}")

    def files():
        return {
            os.path.relpath(os.path.join(d, n), out): open(os.path.join(d, n)).read()
            for d, _, names in os.walk(out)
            for n in names
        }

    before = files()
    assert cli.main(["run", "--out", out, *flags_]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert files() == before  # no stale/, the typo not saved into config.json


@pytest.mark.parametrize("command", ["run", "train-vae", "label"])
def test_a_file_as_the_run_directory_is_one_clear_error(command, tmp_path, capsys):
    path = tmp_path / "afile"
    path.write_text("")
    assert cli.main([command, "--out", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is a file: pass a directory to --out" in err and "Traceback" not in err


def test_flags_override_the_saved_run_config(tmp_path):
    out = str(tmp_path / "run")
    parser = cli.build_parser()
    args = parser.parse_args(
        ["run", "--out", out, "--vae-epochs", "3", "--no-progress", "--vae-channels", "8", "16",
         "--vae-kind", "conv", "--max-train", "none", "--data-seed", "4", "--search-scale", "0.7",
         "--correct-lam", "0.5", "--labeler", "manual"]
    )  # fmt: skip
    _, config = cli.resolve(args)
    assert config.vae_train.epochs == 3 and config.progress is False
    assert config.vae.channels == (8, 16) and config.vae.kind == "conv"
    assert config.classifier is None  # untouched: still chosen from the image shape
    assert config.data.max_train is None and config.data.seed == 4
    assert config.search.scale == 0.7 and config.search.num_samples is None  # sized per run
    assert config.search.validity == "oracle"
    assert config.correct.lam == 0.5 and config.labeler == "manual"
    # The run directory remembers it: a later command with only --out gets the same config,
    # and a new flag changes only its own field.
    save_run_config(out, config)
    _, again = cli.resolve(parser.parse_args(["label", "--out", out]))
    assert again == config
    _, changed = cli.resolve(parser.parse_args(["run", "--out", out, "--search-num-samples", "7"]))
    assert changed.search.num_samples == 7 and changed.search.scale == 0.7
    assert changed.vae == config.vae
    # "none" sets a field that can hold it back to None (here: samples sized from the data).
    save_run_config(out, changed)
    _, sized = cli.resolve(parser.parse_args(["run", "--out", out, "--search-num-samples", "none"]))
    assert sized.search.num_samples is None and sized.search.scale == 0.7


def test_unknown_choice_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--labeler", "human"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "search", "--chains", "256,1024"], "space-separated: write '256 1024'"),
        (["bench", "search", "--run-dir", "runs/x"], "--run-dir was renamed: use --out"),
        (["bench", "search", "--models", "resnet"], "invalid choice: 'resnet'"),
        (["bench", "search", "--dtype", "float16"], "invalid choice: 'float16'"),
        (["bench", "mixture", "--out", "m.json"], "--out was renamed: use --json"),
        (["run", "--search-mode", "annealing"], "invalid choice: 'annealing'"),
        (["run", "runs/x"], "unrecognized arguments: runs/x (a run directory is given with --out"),
        (["info", "--verbose"], "unrecognized arguments: --verbose"),
    ],
)
def test_uniform_flag_conventions_fail_with_the_fix(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bench_search_out_must_be_a_run_directory(tmp_path, capsys):
    code = cli.main(["bench", "search", "--out", str(tmp_path / "r.json"), "--quick"])
    assert code == 2 and "the results file is --json" in capsys.readouterr().err
    os.makedirs(tmp_path / "run" / "train")  # trained, not searched: before any measuring
    code = cli.main(["bench", "search", "--out", str(tmp_path / "run"), "--quick"])
    assert code == 2 and "its search stage has not run" in capsys.readouterr().err
