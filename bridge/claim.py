"""`python -m bridge.claim`: take a free bridge account of this broker, then run the bridge.

For containers started as replicas of one service (`docker compose up --scale bridge-1=3`),
which all get the same environment: each replica claims the first instance number of broker
`TEAMTRACK_BROKER_ID` that no other holds (a lock file per instance in the folder
`TEAMTRACK_CLAIMS_DIR`, shared by the replicas), reads that account's password from the
provisioned credentials (`TEAMTRACK_CREDENTIALS`, default /state) and becomes `python -m bridge`
as `bridge-{broker id}-{instance}`, still holding the lock. A replica that stops, however it
stops, frees its number (the kernel drops the lock with the process). There are as many numbers
as the registry has bridge accounts for the broker (`teamtrack registry --bridges-per-broker N`).
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from teamtrack.mqtt import bridge_username
from teamtrack.provision import load_credentials


class ClaimError(RuntimeError):
    """Every bridge account of the broker is taken."""


def claim_instance(folder: Path, broker_id: str, accounts: int) -> tuple[int, int]:
    """(instance, descriptor holding its lock) of the first free instance from 1 to
    `accounts`; the lock lasts as long as the descriptor (across `exec`, once inheritable)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for instance in range(1, accounts + 1):
        descriptor = os.open(folder / f"{broker_id}-{instance}.lock", os.O_RDWR | os.O_CREAT,
                             0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            continue
        return instance, descriptor
    raise ClaimError(
        f"all {accounts} bridge account(s) of broker {broker_id} are in use: provision more "
        "(teamtrack registry --bridges-per-broker N, then teamtrack provision)"
    )


def main() -> None:
    broker_id = os.environ.get("TEAMTRACK_BROKER_ID", "b1")
    credentials = load_credentials(os.environ.get("TEAMTRACK_CREDENTIALS", "/state"))
    prefix = bridge_username(broker_id, 1).rsplit("-", 1)[0] + "-"
    accounts = sum(1 for bridge in credentials.bridges if bridge.username.startswith(prefix))
    folder = Path(os.environ.get("TEAMTRACK_CLAIMS_DIR", "/claims"))
    try:
        instance, descriptor = claim_instance(folder, broker_id, accounts)
    except (ClaimError, OSError) as error:
        print(f"python -m bridge.claim: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    os.set_inheritable(descriptor, True)
    password = credentials.bridge(bridge_username(broker_id, instance)).password
    environment = {**os.environ, "TEAMTRACK_INSTANCE": str(instance),
                   "TEAMTRACK_MQTT_PASSWORD": password}
    # The interpreter running this, by absolute path: nothing looked up on PATH.
    os.execve(sys.executable, [sys.executable, "-m", "bridge"], environment)  # noqa: S606


if __name__ == "__main__":
    main()
