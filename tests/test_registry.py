from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from teamtrack.registry import (
    DEMO_TEAM_NAMES,
    Device,
    Manager,
    Registry,
    RegistryError,
    demo_registry,
    device_username,
    dump_registry,
    generated_worker_ids,
    load_registry,
    parse_device_username,
    parse_registry,
)

EXAMPLE = """\
teams:
  - id: alpha
    name: Alpha couriers
    workers: [lead-rider, w002]
    worker_count: 3
    managers: [alpha-lead]
  - id: bravo
    workers: [b1]
    managers: [bravo-lead, bravo-night]
bridges: [bridge-1, bridge-2]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    return path


def problem_of(data: object) -> str:
    with pytest.raises(RegistryError) as caught:
        parse_registry(data, "teams.yaml")
    assert str(caught.value).startswith("teams.yaml: ")
    return caught.value.problem


def test_loads_explicit_and_generated_workers_without_duplicates(tmp_path: Path) -> None:
    registry = load_registry(write(tmp_path, EXAMPLE))

    alpha = registry.team("alpha")
    assert alpha.display_name == "Alpha couriers"
    assert alpha.workers == ("lead-rider", "w002", "w001", "w003")
    assert registry.team("bravo").display_name == "bravo"
    assert registry.team_ids == ("alpha", "bravo")
    assert registry.device_count == 5
    assert registry.bridges == ("bridge-1", "bridge-2")
    assert registry.observers == ("observer",)


def test_iterates_devices_and_managers_in_file_order(tmp_path: Path) -> None:
    registry = load_registry(write(tmp_path, EXAMPLE))

    assert list(registry.devices())[:2] == [Device("alpha", "lead-rider"), Device("alpha", "w002")]
    assert list(registry.devices())[-1].username == "bravo.b1"
    assert list(registry.managers()) == [
        Manager("alpha", "alpha-lead"),
        Manager("bravo", "bravo-lead"),
        Manager("bravo", "bravo-night"),
    ]
    assert registry.team_of_manager("bravo-night") == "bravo"
    assert registry.team_of_manager("bridge-1") is None


def test_device_usernames_are_unambiguous(tmp_path: Path) -> None:
    registry = load_registry(write(tmp_path, EXAMPLE))

    assert registry.device_username("alpha", "w003") == "alpha.w003"
    assert parse_device_username("alpha.w003") == ("alpha", "w003")
    assert parse_device_username("alpha-lead") is None
    assert parse_device_username("alpha.w.3") is None
    assert registry.has_worker("bravo", "b1")
    assert not registry.has_worker("bravo", "w001")
    with pytest.raises(KeyError):
        registry.device_username("bravo", "w001")


def test_registry_is_immutable(tmp_path: Path) -> None:
    registry = load_registry(write(tmp_path, EXAMPLE))
    with pytest.raises(ValueError, match="frozen"):
        setattr(registry, "bridges", ())  # noqa: B010 (mypy does not know the model is frozen)


def test_generated_worker_ids_keep_at_least_three_digits() -> None:
    assert generated_worker_ids(3) == ["w001", "w002", "w003"]
    assert generated_worker_ids(1200)[-1] == "w1200"
    assert generated_worker_ids(1200)[0] == "w0001"
    assert generated_worker_ids(0) == []


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"teams": [{"id": "Alpha"}]}, "teams[0] (id 'Alpha').id: team id 'Alpha' is not a slug"),
        ({"teams": [{"id": "a", "workers": ["w 1"]}]}, "worker 'w 1' is not a slug"),
        ({"teams": [{"id": "a", "workers": ["x", "x"]}]}, "worker listed more than once: x"),
        ({"teams": [{"id": "a"}, {"id": "a"}]}, "team id listed more than once: a"),
        ({"teams": [{"id": "a", "managers": ["Boss"]}]}, "manager username 'Boss' is not a slug"),
        ({"teams": [{"id": "a", "worker_count": "ten"}]}, "worker_count must be an integer"),
        ({"teams": [{"id": "a", "worker_count": -1}]}, "worker_count must be between"),
        ({"teams": [{"id": "a", "colour": "red"}]}, "colour: Extra inputs are not permitted"),
        ({"teams": []}, "teams: at least one team is required"),
        ({"bridges": ["bridge"]}, "teams: Field required"),
        ({"teams": [{"id": "a"}], "bridges": ["a.b"]}, "bridge username 'a.b' is not a slug"),
        ({"teams": [{"id": "a"}], "observers": ["x", "x"]}, "observer username listed more"),
    ],
)
def test_rejects_invalid_registries_with_the_location(data: object, expected: str) -> None:
    assert expected in problem_of(data)


@pytest.mark.parametrize(
    "data",
    [
        # A manager in two teams would see both; a name shared between roles would merge them.
        {"teams": [{"id": "a", "managers": ["boss"]}, {"id": "b", "managers": ["boss"]}]},
        {"teams": [{"id": "a", "managers": ["bridge-b1-1"]}]},
        {"teams": [{"id": "a"}], "bridges": ["watch"], "observers": ["watch"]},
    ],
)
def test_usernames_are_unique_across_roles(data: object) -> None:
    assert "is used twice" in problem_of(data)


def test_reports_every_problem_at_once() -> None:
    problem = problem_of({"teams": [{"id": "a", "workers": ["X"]}, {"id": "B"}]})
    assert "teams[0] (id 'a').workers" in problem
    assert "teams[1] (id 'B').id" in problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("teams: [", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
        ("", "must be a mapping"),
    ],
)
def test_bad_files_name_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RegistryError, match=expected) as caught:
        load_registry(path)
    assert str(path) in str(caught.value)


def test_missing_file_is_a_registry_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="cannot read"):
        load_registry(tmp_path / "absent.yaml")


def test_demo_registry_names_teams_readably() -> None:
    registry = demo_registry(teams=3, workers=50)

    assert registry.team_ids == ("alpha", "bravo", "charlie")
    assert registry.device_count == 150
    assert registry.team("bravo").workers[0] == "w001"
    assert registry.team("bravo").workers[-1] == "w050"
    assert registry.team("charlie").managers == ("charlie-lead",)
    assert registry.team("alpha").display_name == "Alpha"


def test_demo_registry_continues_with_numbered_teams() -> None:
    registry = demo_registry(teams=len(DEMO_TEAM_NAMES) + 2, workers=1)

    assert registry.team_ids[len(DEMO_TEAM_NAMES) - 1] == "zulu"
    assert registry.team_ids[-2:] == ("team-27", "team-28")
    assert registry.team_of_manager("team-28-lead") == "team-28"


def test_demo_registry_rejects_no_teams() -> None:
    with pytest.raises(ValueError, match="at least one team"):
        demo_registry(teams=0, workers=5)


def test_dump_round_trips_and_stays_compact(tmp_path: Path) -> None:
    registry = demo_registry(teams=2, workers=1000)
    path = dump_registry(registry, tmp_path / "state" / "registry.yaml")

    assert load_registry(path) == registry
    document = yaml.safe_load(path.read_text())
    assert document["teams"][0]["worker_count"] == 1000
    assert "workers" not in document["teams"][0]
    assert len(path.read_text()) < 500


def test_dump_keeps_explicit_workers_and_names(tmp_path: Path) -> None:
    registry = load_registry(write(tmp_path, EXAMPLE))
    reloaded = load_registry(dump_registry(registry, tmp_path / "copy.yaml"))

    assert reloaded == registry
    assert reloaded.team("alpha").name == "Alpha couriers"
    assert isinstance(reloaded, Registry)


def test_module_level_device_username_matches_registry() -> None:
    registry = demo_registry(teams=1, workers=1)
    assert registry.device_username("alpha", "w001") == device_username("alpha", "w001")


def test_every_bridge_process_has_an_account_of_its_own() -> None:
    # Brokers take the username as the client id: two bridges on one account would take each
    # other's session over.
    registry = demo_registry(1, 1, brokers=2, bridges_per_broker=2)
    assert registry.bridges == ("bridge-b1-1", "bridge-b1-2", "bridge-b2-1", "bridge-b2-2")
    assert Registry(teams=registry.teams).bridges == ("bridge-b1-1", "bridge-b2-1")


def test_retention_days_is_optional_per_team_and_round_trips(tmp_path: Path) -> None:
    # A registry written before the field existed stays valid: every team takes the default.
    older = load_registry(write(tmp_path, EXAMPLE))
    assert older.retention_days(90) == {"alpha": 90, "bravo": 90}
    text = EXAMPLE.replace("    workers: [b1]\n", "    workers: [b1]\n    retention_days: 7\n")
    registry = load_registry(write(tmp_path, text))
    assert registry.retention_days(90) == {"alpha": 90, "bravo": 7}
    assert load_registry(dump_registry(registry, tmp_path / "copy.yaml")) == registry
    assert "retention_days" not in yaml.safe_load((tmp_path / "copy.yaml").read_text())[
        "teams"][0]
    problem = problem_of({"teams": [{"id": "alpha", "retention_days": -1}]})
    assert "teams[0] (id 'alpha').retention_days" in problem
