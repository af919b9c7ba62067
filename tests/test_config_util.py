"""The one comma-list parser (config_util.parse_list) and the flags that go through it."""
import pytest

from chmr_jax import cli, config_util


def test_parse_list_strips_drops_empty_and_casts():
    assert config_util.parse_list(" a, b ,,c, ") == ["a", "b", "c"]
    assert config_util.parse_list(None) == [] and config_util.parse_list("") == [] and config_util.parse_list(" , ") == []
    assert config_util.parse_list("1, 3,10", int) == [1, 3, 10]
    assert config_util.parse_list("0,0.25", float) == [0.0, 0.25]
    assert config_util.parse_list(7, int) == [7]       # a config field overridden with a bare number


def test_parse_list_names_the_bad_item_and_the_field():
    with pytest.raises(ValueError, match=r"^config\.seeds='0, x,2': item 'x' is not a valid int$"):
        config_util.parse_list("0, x,2", int, "config.seeds")
    with pytest.raises(ValueError, match=r"^comma list='1,2\.5': item '2\.5' is not a valid int$"):
        config_util.parse_list("1,2.5", int)


def test_cli_lists_go_through_the_parser(tmp_path, capsys):
    # Spaces after commas are not part of a dataset name ...
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--dataset", "bace, tox21"])
    assert "unknown dataset(s) ['tox21']" in capsys.readouterr().err
    # ... an empty list is not 'no datasets, nothing to do' ...
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--dataset", " , "])
    assert "unknown dataset(s) ' , '" in capsys.readouterr().err
    # ... and a bad number is one line naming the flag and the item, exit 2.
    assert cli.main(["stress", "--workdir", str(tmp_path), "--missing", "0,0.5,lots"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "chmr-jax stress: --missing='0,0.5,lots': item 'lots' is not a valid float"
