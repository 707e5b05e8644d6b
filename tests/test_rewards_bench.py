"""The reward benchmark's reusable helpers and a smoke run on the tiny DINOv2."""
from __future__ import annotations

from launch.bench.rewards import BENCH_COLUMNS, BenchRow, main, markdown_table, time_call


def test_markdown_table_and_rows():
    rows = [BenchRow("der", "tiny", 4, 0.5), BenchRow("ber", "-", None, float("nan"), note="skipped")]
    table = markdown_table(rows, BENCH_COLUMNS).splitlines()
    assert table[0] == "| expert | variant | batch | ms / call | samples/s | note |"
    assert table[1] == "|---|---|---:|---:|---:|---|"
    assert table[2] == "| der | tiny | 4 | 500.0 | 8.00 |  |"
    assert table[3] == "| ber | - | - | - | - | skipped |"
    assert markdown_table([{"a": 1.234}], [("a", "A", ".1f")]).endswith("| 1.2 |")


def test_time_call_counts_calls():
    calls = []
    assert time_call(lambda: calls.append(1), repeats=3, warmup=2) >= 0
    assert len(calls) == 5


def test_main_smoke(capsys):
    table = main(["--experts", "der", "ber", "--batch-sizes", "1", "2", "--repeats", "1"])
    assert "| der | tiny random | 2 |" in table and "| ber | tiny random | 1 |" in table
    assert table in capsys.readouterr().out
