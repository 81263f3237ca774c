"""The device scripts' host-side helpers (tools/gpu), run here on small
inputs: tools/gpu/suite_rest.py lists exactly the tests a cut-short GPU
suite did not finish."""
import glob
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_suite_rest_lists_the_unfinished_tests(tmp_path):
    ids = ["tests/a.py::t[x]", "tests/a.py::u[y-1]", "tests/b.py::v", "tests/b.py::w[cuda-bf16]",
           "tests/b.py::z"]
    (tmp_path / "ids.txt").write_text("3 tests in 2 shards\n" + "\n".join(ids) + "\n")
    # A shard's -v log: a pass, a failure reported by instafail before its
    # outcome word, a skip with a reason, a test cut off mid-run (no
    # outcome), and one never reached.
    (tmp_path / "log.txt").write_text(
        "== gpu_out/pytest_shard0.txt\n"
        "tests/a.py::t[x] PASSED                                  [ 20%]\n"
        "tests/a.py::u[y-1] \n"
        "FAILED-NOW tests/a.py::u[y-1] (call)\nAssertionError: out differs\nFAILED [ 40%]\n"
        "tests/b.py::v SKIPPED (needs >= 2 gpu devices)            [ 60%]\n"
        "tests/b.py::w[cuda-bf16] \n")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu", "suite_rest.py"),
                          str(tmp_path / "ids.txt"), str(tmp_path / "log.txt")],
                         capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["tests/b.py::w[cuda-bf16]", "tests/b.py::z"]
    assert "5 collected, 3 finished, 2 left" in run.stderr


def test_forward_probes_apply_to_the_tree(tmp_path):
    """Every A/B probe of tools/gpu/forward_probes still applies to the
    kernel file it patches, so a kernel change that breaks
    one shows here rather than on the GPU machine."""
    patch = shutil.which("patch")
    assert patch, "GNU patch is needed to apply the probes"
    folder = os.path.join(ROOT, "tools", "gpu", "forward_probes")
    probes = sorted(glob.glob(os.path.join(folder, "*.patch")))
    assert probes
    kernel = os.path.join(ROOT, "xla_ffi", "cuda", "attention_sm90.cu")
    for probe in probes:
        target = tmp_path / "attention_sm90.cu"
        shutil.copy(kernel, target)
        with open(probe) as f:
            run = subprocess.run([patch, "--quiet", "--batch", str(target)], stdin=f,
                                 capture_output=True, text=True)
        assert run.returncode == 0, (probe, run.stdout + run.stderr)
        assert target.read_text() != open(kernel).read()
