"""Version folders and version policies of the model repository."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from moesaic.nodes.repository import scan_models, scan_repository
from moesaic.nodes.versions import VersionPolicy, find_versions
from tests.helpers.onnx_models import write_offset_model


@pytest.mark.parametrize(
    ("policy", "available", "served"),
    [
        ({}, [1, 2, 3], [3]),
        ({"latest": 2}, [3, 1, 2], [2, 3]),
        ({"latest": 5}, [1, 2], [1, 2]),
        ({"specific": [1, 3]}, [1, 2, 3], [1, 3]),
        ({"specific": [4]}, [1, 2, 3], []),
        ({"all": True}, [2, 7], [2, 7]),
        ({"latest": {"num_versions": 2}}, [1, 2, 3], [2, 3]),  # Triton's JSON forms
        ({"specific": {"versions": [2]}}, [1, 2, 3], [2]),
        ({"all": {}}, [1, 2], [1, 2]),
    ],
)
def test_policy_selects(policy: dict[str, Any], available: list[int], served: list[int]) -> None:
    assert VersionPolicy.model_validate(policy).select(available) == served


@pytest.mark.parametrize(
    ("policy", "match"),
    [
        ({"latest": 0}, "greater than or equal to 1"),
        ({"latest": 1, "all": True}, "choose one of latest, specific, all"),
        ({"specific": [0]}, "versions are numbers >= 1"),
        ({"newest": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_policies_fail(policy: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VersionPolicy.model_validate(policy)


def test_numbered_folders_are_versions_and_a_flat_folders_files_are_version_1(tmp_path: Path) -> None:
    write_offset_model(tmp_path / "flat", 1.0)
    write_offset_model(tmp_path / "triton" / "1", 1.0)
    write_offset_model(tmp_path / "triton" / "10", 10.0)
    (tmp_path / "triton" / "0").mkdir()  # not a version (as in Triton)
    (tmp_path / "triton" / "latest").mkdir()
    (tmp_path / "empty").mkdir()
    assert find_versions(tmp_path / "flat") == {1: tmp_path / "flat"}
    write_offset_model(tmp_path / "flat" / "2", 2.0)  # a new version beside a flat folder
    assert find_versions(tmp_path / "flat") == {1: tmp_path / "flat", 2: tmp_path / "flat" / "2"}
    assert find_versions(tmp_path / "triton") == {
        1: tmp_path / "triton" / "1",
        10: tmp_path / "triton" / "10",
    }
    assert find_versions(tmp_path / "empty") == {}


def test_scan_serves_the_policy_and_warns_about_folders_without_models(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_offset_model(tmp_path / "affine" / "1", 1.0)
    write_offset_model(tmp_path / "affine" / "2", 2.0)
    write_offset_model(tmp_path / "pair" / "1", 1.0)
    write_offset_model(tmp_path / "pair" / "2", 2.0, model_yaml="class_names: [two]\n")
    (tmp_path / "pair" / "model.yaml").write_text("version_policy: {all: true}\nclass_names: [one]\n")
    (tmp_path / "notes").mkdir()
    with caplog.at_level(logging.WARNING):
        entries = scan_repository(tmp_path)
    assert "skipping" in caplog.text and "notes" in caplog.text
    assert entries["affine"].served_versions() == [2]
    served = {(m.name, m.version): m for m in scan_models(tmp_path)}
    assert sorted(served) == [("affine", 2), ("pair", 1), ("pair", 2)]
    # A version folder's model.yaml overrides the shared one's keys for that version.
    assert served[("pair", 1)].class_names == ["one"] and served[("pair", 2)].class_names == ["two"]
    assert served[("pair", 2)].folder == tmp_path / "pair" / "2"


@pytest.mark.parametrize("key", ["name: other\n", "version_policy: {latest: 2}\n"])
def test_a_version_folder_may_not_rename_or_repolicy_its_model(tmp_path: Path, key: str) -> None:
    write_offset_model(tmp_path / "m" / "1", 1.0, model_yaml=key)
    with pytest.raises(ValueError, match=r"1/model.yaml: .*belongs in .*m/model.yaml"):
        scan_models(tmp_path)
