"""pytest plugin (-p instafail, tools/gpu on PYTHONPATH): prints each
failure's report the moment the test fails, so that a shard cut short by a
time limit still says what failed and why."""


def pytest_runtest_logreport(report):
    if report.failed:
        text = str(report.longrepr)
        print(f"\nFAILED-NOW {report.nodeid} ({report.when})\n{text[-2500:]}\n", flush=True)
