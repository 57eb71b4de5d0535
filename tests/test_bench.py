"""`python -m bench all --quick`: every scenario runs end to end against real supervisors
and leaves complete, well-formed output. Never its speed: figures belong to the bench's
reports, not to a pass/fail test."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.bench

FINAL_KEYS = {
    "throughput": {"engine_per_s", "raw_per_s", "pgqueuer_per_s", "ratio_raw",
                   "ratio_pgqueuer", "own_sql_per_s", "ratio_own_sql_raw",
                   "ratio_engine_own_sql"},
    "enqueue": {"start_many_per_s", "batch_http_per_s", "pgqueuer_enqueue_per_s"},
    "latency": {"p50_ms", "p95_ms", "p99_ms"},
}


@pytest.fixture(scope="module")
def quick_run(server_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    environ = {key: value for key, value in os.environ.items()
               if not key.startswith("ORCH8_")} | {"DATABASE_URL": server_dsn}
    result = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--quick", "--out", str(out)],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), out


def _is_figure(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_the_last_line_is_one_json_object_with_every_named_figure(quick_run):
    final, _ = quick_run
    assert final["scenario"] == "all"
    for scenario, keys in FINAL_KEYS.items():
        assert {key: _is_figure(final[scenario][key]) for key in keys} == dict.fromkeys(keys, True)
    assert set(SCENARIOS) <= final.keys()


def test_the_json_file_holds_every_figure_with_its_settings_and_machine(quick_run):
    final, out = quick_run
    document = json.loads((out / "bench-all.json").read_text())
    assert document["machine"]["cores"] >= 1 and document["machine"]["python"]
    assert document["postgresql"]["version"]
    assert set(document["scenarios"]) == set(SCENARIOS)
    for name, scenario in document["scenarios"].items():
        assert scenario["records"], name
        for record in scenario["records"]:
            assert _is_figure(record["value"]) and record["load_1m"] >= 0, (name, record)
            assert record.get("complete", True) is True, (name, record)
        assert all(stats["n"] >= 1 for stats in scenario["stats"].values()), name
    assert document["recommendation"]["batch_size"] >= 1
    assert document["recommendation"]["tick_interval_ms"] >= 1
    assert [str(path) for path in sorted(out.iterdir())] == sorted(final["files"])


def test_markdown_and_plots_are_written(quick_run):
    _, out = quick_run
    text = (out / "bench-all.md").read_text()
    assert all(f"## {name}\n" in text for name in SCENARIOS)
    assert "Recommendation for this machine" in text
    plots = sorted(path.name for path in out.glob("*.png"))
    assert plots == ["bench-all-latency.png", "bench-all-scale.png", "bench-all-throughput.png"]
    assert all((out / name).read_bytes().startswith(b"\x89PNG\r\n") for name in plots)


def test_the_recorded_command_names_no_path_of_this_machine(quick_run):
    # The output directory (a temporary one here) is where the files went, not a setting.
    _, out = quick_run
    document = json.loads((out / "bench-all.json").read_text())
    assert document["command"] == "python -m bench all --quick"
    assert str(out) not in (out / "bench-all.md").read_text()
