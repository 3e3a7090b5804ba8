"""The command line: subcommands registered on `visor`, flags reach the settings, bad input exits 2 early."""

import json

import pytest

from visor.training import cli

from training_helpers import set_flags


def _main(argv):
    return cli.main(argv)


def test_subcommands_are_registered_on_the_visor_command():
    from visor import cli as visor_cli

    assert "visor.training.cli" in visor_cli._SUBCOMMAND_MODULES
    import argparse

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--recipe", "full", "--data", "synthetic", "--model", "tiny", "--output", "x",
                              "--max-steps", "5", "--set", "batch_size=8", "--resume"])
    assert args.max_steps == 5 and args.overrides == ["batch_size=8"] and args.resume
    args = parser.parse_args(["configurations", "search", "--model", "m", "--data", "synthetic", "--output", "o"])
    assert args.func is cli.run_search


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--recipe", "bogus", "--model", "tiny"], "unknown recipe"),
        (["--recipe", "full", "--init", "/no/such/checkpoint"], "does not exist"),
        (["--recipe", "full", "--model", "tiny", "--set", "no_such_setting=1"], "unknown training settings"),
    ],
)
def test_bad_input_exits_with_a_clear_message(tmp_path, capsys, toy_path, argv, message):
    status = _main(["train", "--data", toy_path, "--output", str(tmp_path / "run"), "--no-progress", *argv])
    assert status == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_data_spec_that_matches_nothing(tmp_path, capsys):
    status = _main(["train", "--recipe", "full", "--data", "nothing-here", "--model", "tiny",
                    "--output", str(tmp_path / "run")])
    assert status == 2 and "matches nothing" in capsys.readouterr().err


def test_yaml_and_flags_reach_the_run(tmp_path, capsys, toy_path):
    config = tmp_path / "train.yaml"
    config.write_text("learning_rate: 2.0e-3\nbatch_size: 8\n")
    status = _main(["train", "--recipe", "full", "--data", toy_path, "--model", "tiny", "--output", str(tmp_path / "run"),
                    "--max-steps", "2", "--config", str(config), "--no-progress", *set_flags(batch_size=2)])
    assert status == 0
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["learning_rate"] == 2e-3 and settings["batch_size"] == 2 and settings["max_steps"] == 2
