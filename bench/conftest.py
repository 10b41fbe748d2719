"""Benchmark suite configuration: size set, parametrisation and the result recorder.

Rows are appended to bench/results/*.csv at the end of the session only when timings were taken
(pytest-benchmark enabled) and either CUDA is present or recording is forced
(``--bench-record=yes`` / ``ABFT_BENCH_RECORD=1``); ``--bench-record=no`` / ``ABFT_BENCH_RECORD=0``
turns it off. The CPU smoke (``--benchmark-disable``) therefore never touches the CSVs.
"""
import os

import bench_record
import benchlib
import pytest
import torch


def pytest_addoption(parser):
    g = parser.getgroup("abft-bench")
    g.addoption("--bench-sizes", choices=benchlib.SIZE_SETS, default=None,
                help="size set: smoke (CPU/CI), quick, gpu (default: gpu on CUDA with timing on, "
                     "else smoke); also $ABFT_BENCH_SIZES")
    g.addoption("--bench-record", choices=("auto", "yes", "no"), default=None,
                help="append rows to bench/results/*.csv: auto = on CUDA with timing on "
                     "(default; also $ABFT_BENCH_RECORD=1/0)")


class Recorder:
    def __init__(self, config):
        self.sizes = benchlib.choose_sizes(config)
        self.timing = benchlib.timing_enabled(config)
        flag = config.getoption("--bench-record", default=None) or {
            "1": "yes", "0": "no"}.get(os.environ.get("ABFT_BENCH_RECORD", ""), "auto")
        self.enabled = self.timing and (flag == "yes" or (flag == "auto"
                                                          and torch.cuda.is_available()))
        self.meta = bench_record.run_metadata() if self.enabled else {}
        self.rows = {t: [] for t in bench_record.COLUMNS}
        self.written = []

    def add(self, table, **row):
        if self.enabled:
            self.rows[table].append({**self.meta, **row})

    def flush(self):
        for table, rows in self.rows.items():
            if rows:
                self.written.append((bench_record.append_rows(table, rows), len(rows)))
            self.rows[table] = []


def pytest_configure(config):
    config._abft_bench = Recorder(config)


@pytest.fixture(scope="session")
def recorder(pytestconfig):
    return pytestconfig._abft_bench


def pytest_generate_tests(metafunc):
    rec = metafunc.config._abft_bench
    if "op_case" in metafunc.fixturenames:
        cases = benchlib.op_cases(rec.sizes)
        metafunc.parametrize("op_case", cases, ids=[benchlib.op_case_id(c) for c in cases])
    if "e2e_case" in metafunc.fixturenames:
        cases = benchlib.e2e_cases(rec.sizes)
        metafunc.parametrize("e2e_case", cases, ids=[benchlib.e2e_case_id(c) for c in cases])


def pytest_sessionfinish(session, exitstatus):
    rec = getattr(session.config, "_abft_bench", None)
    if rec is not None:
        rec.flush()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rec = getattr(config, "_abft_bench", None)
    if rec is None:
        return
    if rec.written:
        for path, n in rec.written:
            terminalreporter.write_line(f"abft-bench: appended {n} rows to {path}")
    elif rec.sizes != "smoke" or rec.enabled:
        terminalreporter.write_line(f"abft-bench: sizes={rec.sizes}, nothing recorded "
                                    f"(timing={'on' if rec.timing else 'off'})")
