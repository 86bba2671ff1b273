"""The load script (``python -m tests.load``) on a tiny scale, so it keeps working: 0 lost, 0 duplicated."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_load_script_smoke(fake, redis_db, redis_client, tmp_path):
    from load import print_report, run_load  # tests/ is on sys.path (tests/conftest.py)

    result = run_load(users=2, images=2, fake=fake, redis_url=redis_db[0], work_dir=tmp_path, timeout_s=60)
    print_report(result)
    assert (result["requests"], result["answered"], result["lost"], result["duplicated"]) == (4, 4, 0, 0)
    assert result["missing_heat_map"] == 0
    assert result["latency_text_s"]["p50"] is not None
