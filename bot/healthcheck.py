"""``python -m bot.healthcheck``: exit 0 when the bot's heartbeat file is fresh (container health check)."""

from __future__ import annotations

import sys
import time

from contract.settings import ServiceSettings

MAX_AGE_S = 90


def main() -> int:
    path = ServiceSettings().HEARTBEAT_FILE
    if path is None:
        print("HEARTBEAT_FILE is not set", file=sys.stderr)
        return 1
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        print("no heartbeat yet", file=sys.stderr)
        return 1
    if age > MAX_AGE_S:
        print(f"heartbeat is {age:.0f}s old", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
