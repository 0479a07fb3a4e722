"""The simulator's results do not move under restructuring: small versions of the main job and of the
``lemix_paper`` / ``harli_paper`` sweeps give exactly the pinned summaries and records."""
import json

import pytest

from pinned_runs import PIN_FILE, RUNS, pinned_result

PINS = json.loads(PIN_FILE.read_text())


@pytest.mark.parametrize("name", sorted(RUNS))
def test_results_unchanged(name):
    got = pinned_result(RUNS[name])
    want = PINS[name]
    moved = {k: (want.get(k), got.get(k)) for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)}
    assert not moved, f"{name}: results moved (pinned, now): {moved}"
