"""Devices' HTTP logins against the brokers' password file (`teamtrack.device_auth`) and
Mosquitto's hash formats (`teamtrack.passwords`)."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import pytest

from teamtrack import device_auth
from teamtrack.device_auth import DeviceAccounts, read_device_hashes
from teamtrack.passwords import hash_mosquitto_password, verify_mosquitto_password
from teamtrack.provision import ProvisionResult


def test_the_hashes_mosquitto_passwd_wrote_are_checked(provisioned: ProvisionResult) -> None:
    hashes = read_device_hashes(provisioned.password_file)
    device = provisioned.credentials.device("alpha", "w001")
    assert hashes[device.username].startswith("$7$")
    assert verify_mosquitto_password(device.password, hashes[device.username])
    assert not verify_mosquitto_password(device.password + "x", hashes[device.username])
    # Only devices: the managers', bridges' and the observer's lines are not even kept.
    assert set(hashes) == {d.username for d in provisioned.credentials.devices}


def test_mosquitto_hash_formats() -> None:
    salt = os.urandom(12)
    legacy = "$6${}${}".format(
        base64.b64encode(salt).decode(),
        base64.b64encode(hashlib.sha512(b"secret" + salt).digest()).decode(),
    )
    assert verify_mosquitto_password("secret", legacy)
    assert not verify_mosquitto_password("other", legacy)
    assert verify_mosquitto_password("secret", hash_mosquitto_password("secret", 1000))
    for broken in ("", "secret", "$7$101$!!$AA==", "$7$0$AAAA$AAAA", "$7$99999999$AAAA$AAAA",
                   "$7$101$AAAA$AAAA", "$5$AAAA$AAAA", "scrypt$1$2$3$4$5"):
        assert not verify_mosquitto_password("secret", broken), broken


async def test_a_login_costs_one_hash_check_per_account_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "passwd"
    path.write_text(f"alpha.w001:{hash_mosquitto_password('pw')}\n"
                    f"manager-alpha:{hash_mosquitto_password('pw')}\n")
    checks = []
    real = device_auth.verify_mosquitto_password

    def counting(password: str, encoded: str) -> bool:
        checks.append(password)
        return real(password, encoded)

    monkeypatch.setattr(device_auth, "verify_mosquitto_password", counting)
    accounts = DeviceAccounts(path)
    for _ in range(5):
        login = await accounts.authenticate("alpha.w001", "pw")
        assert login is not None and (login.team, login.worker) == ("alpha", "w001")
    assert checks == ["pw"]
    for _ in range(2):
        assert await accounts.authenticate("alpha.w001", "wrong") is None
    assert checks == ["pw", "wrong", "wrong"]  # failures are never remembered
    assert await accounts.authenticate("manager-alpha", "pw") is None
    assert await accounts.authenticate("alpha.w002", "pw") is None
    assert len(checks) == 3  # neither a manager's nor an unknown account is checked


async def test_a_changed_file_is_read_again_and_decides_open_logins(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text(f"alpha.w001:{hash_mosquitto_password('pw')}\n")
    accounts = DeviceAccounts(path)
    login = await accounts.authenticate("alpha.w001", "pw")
    assert login is not None
    assert not await accounts.reload_if_changed()
    path.write_text(f"alpha.w001:{hash_mosquitto_password('pw')}\n")  # new salt, same password
    assert await accounts.reload_if_changed()
    assert await accounts.still_valid(login, "pw")
    replacement = tmp_path / "passwd.new"
    replacement.write_text(f"alpha.w002:{hash_mosquitto_password('pw')}\n")
    os.replace(replacement, path)  # as provisioning writes it: renamed into place
    assert await accounts.reload_if_changed()
    assert not await accounts.still_valid(login, "pw")
    assert await accounts.authenticate("alpha.w001", "pw") is None
    path.unlink()
    assert not await accounts.reload_if_changed()  # gone: the accounts in force stay
    assert "alpha.w002" in accounts
