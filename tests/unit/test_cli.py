"""The `moesaic` command as users meet it: help with defaults and an example for every
sub-command, the nearest command, choice or option suggested for a typo, one-line errors for
bad files, and the example problem file of `moesaic select`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moesaic.cli import EXAMPLES, _sub_parsers, build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def _commands() -> list[tuple[str, argparse.ArgumentParser]]:
    return list(_sub_parsers(build_parser()))


@pytest.mark.parametrize("path", [p for p, _ in _commands()])
def test_every_sub_command_has_an_example_and_shows_its_defaults(path: str) -> None:
    parser = dict(_commands())[path]
    text = parser.format_help()
    assert "example:\n  moesaic " in text, f"moesaic {path} --help has no example"
    assert path in EXAMPLES
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in (action.help or "").lower(), f"moesaic {path} {action.option_strings[0]}"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["nod"], "unknown command 'nod'; did you mean 'node'?"),
        (["improt-model"], "did you mean 'import-model'?"),
        (["train", "detecter"], "unknown command 'detecter'; did you mean 'detector'?"),
        (["node", "--modles", "x"], "'--modles' (did you mean --models?)"),
        (
            ["bev", "scan.bin", "--out", "x.png", "--mode", "mult"],
            "invalid choice 'mult'; did you mean 'multi'?",
        ),
        (["zzzzzz"], "unknown command 'zzzzzz'; one of "),
    ],
)
def test_typos_get_the_nearest_suggestion(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "content", "message"),
    [
        (
            ["select", "--problem"],
            b"\xc8\x00\xff binary",
            "not a text file (byte 0xc8 at offset 0 is not UTF-8)",
        ),
        (["select", "--problem"], b'{"experts": [', "not valid JSON: Expecting value at line 1 column 14"),
        (["coordinator", "--config"], b"\x89PNG\r\n\x1a\n", "not a text file"),
        (
            ["coordinator", "--config"],
            b"nodes: [\n  - {address: x",
            "not valid YAML: line 2 column 3: expected the node content, but found '-'",
        ),
        (["coordinator", "--config"], b"nodes: 3\n", "nodes: Input should be a valid list"),
    ],
)
def test_bad_files_fail_in_one_line_naming_the_file(
    tmp_path: Path, command: list[str], content: bytes, message: str
) -> None:
    path = tmp_path / "given"
    path.write_bytes(content)
    proc = subprocess.run(
        [sys.executable, "-m", "moesaic", *command, str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0] and message in lines[0], lines[0]


def test_the_example_problem_file_selects_by_budget(capsys: pytest.CaptureFixture[str]) -> None:
    problem = ROOT / "examples" / "select-problem.json"
    chosen = {}
    for budget in (["--latency-ms", "0", "--energy-mj", "0"], [], ["--energy-mj", "200"]):
        assert main(["select", "--problem", str(problem), "--json", "--brute-force", *budget]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["matches_brute_force"] and out["feasible"]
        chosen[" ".join(budget)] = tuple(out["selected"])
    assert len(set(chosen.values())) == 3, chosen  # each budget its own expert set
