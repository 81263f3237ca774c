"""The GPU suite's test ids that a cut-short run of pytest_shards.sh did not
finish, so that the next call runs only those (IDS_FILE=):

    python3 tools/gpu/suite_rest.py TEST_IDS GPU_SUITE_LOG... > rest.txt

TEST_IDS is the run's test_ids.txt (every id collected), each log a
gpu_suite.txt (the shards' `pytest -v` output). A test counts as finished
when its `-v` line carries an outcome (or instafail reported it); one cut
off mid-run has none and is listed again. The summary goes to stderr."""
import re
import sys

OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
FAILED_NOW = re.compile(r"^FAILED-NOW (\S+::\S+) ")  # tools/gpu/instafail.py


def finished_ids(log_lines):
    return {m.group(1) for line in log_lines
            if (m := OUTCOME.match(line) or FAILED_NOW.match(line))}


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    with open(argv[1]) as f:
        collected = [line.strip() for line in f if "::" in line]
    done = set()
    for path in argv[2:]:
        with open(path, errors="replace") as f:
            done |= finished_ids(f)
    rest = [test_id for test_id in collected if test_id not in done]
    print("\n".join(rest))
    print(f"{len(collected)} collected, {len(collected) - len(rest)} finished, {len(rest)} left",
          file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv)
