"""The command line's grammar: ``--use-case`` is taken wherever a user would put it."""

from __future__ import annotations

import pytest

from pipeline.faces import cli

COMMANDS = [
    ["models", "list"],
    ["models", "show", "churn-20250101-0000abcd"],
    ["models", "promote", "churn-20250101-0000abcd", "--reason", "reviewed"],
    ["models", "rollback", "--reason", "bad night"],
    ["run", "--date", "2025-06-01"],
    ["monitor", "--date", "2025-06-01"],
    ["report", "--date", "2025-06-01"],
    ["summary"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_use_case_is_taken_after_the_subcommand_and_at_the_end(command: list[str]) -> None:
    parser = cli.build_parser()
    at_end = parser.parse_args([*command, "--use-case", "churn"])
    after = parser.parse_args([command[0], "--use-case", "churn", *command[1:]])
    left_out = parser.parse_args(command)
    assert (at_end.use_case, after.use_case, left_out.use_case) == ("churn", "churn", None)
    assert vars(at_end) == vars(after)
