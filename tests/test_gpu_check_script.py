"""tools/gpu_check.sh on a machine without a GPU: run whole, with stand-ins on PATH for the Python it is pointed at
(GPU_CHECK_PYTHON) and for nvidia-smi, so its own logic (where it finds the CLI, what it asks pip for offline, its
summary) is checked here rather than on a lent GPU machine's minutes."""
import os
import stat
import subprocess
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A Python as a Debian-based image has it (NGC's, say): pip puts the scripts it installs in /usr/local/bin, not
# beside /usr/bin/python3, so nothing named speccompile is in this stand-in's directory. Its pip behaves as pip with
# --no-index does: an editable install with build isolation needs setuptools from the wheelhouse, which has none.
FAKE_PYTHON = textwrap.dedent("""\
    #!/usr/bin/env bash
    echo "$*" >> "$FAKE_LOG"
    args=" $* "
    if [[ $args == *" -m pip show "* ]]; then exit 1; fi  # no CPU onnxruntime installed
    if [[ $args == *" -m pip install "* && $args == *" --no-index "* && $args == *" -e "* \\
          && $args != *" --no-build-isolation "* ]]; then
      echo "ERROR: Could not find a version that satisfies the requirement setuptools>=68"; exit 1
    fi
    exit 0
    """)


def executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture(scope="module")
def offline_check(tmp_path_factory):
    """Run gpu_check.sh offline (GPU_CHECK_WHEELS, a fake TensorRT wheel in it) with the stand-in Python; returns
    (the summary's lines by stage, the stand-in's calls)."""
    tmp_path = tmp_path_factory.mktemp("gpu_check")
    image, wheels, out = tmp_path / "image", tmp_path / "wheels", tmp_path / "out"
    for d in (image, wheels):
        d.mkdir()
    executable(image / "python3", FAKE_PYTHON)
    executable(image / "nvidia-smi", "#!/bin/sh\necho 'Fake GPU, 0, 1 MiB'\n")
    (wheels / "tensorrt_cu12-10.8.0-py3-none-manylinux_2_17_x86_64.whl").write_bytes(b"")
    log = tmp_path / "calls.log"
    env = dict(os.environ, PATH=f"{image}:{os.environ['PATH']}", FAKE_LOG=str(log), GPU_CHECK_BUDGET_S="120",
               GPU_CHECK_PYTHON=str(image / "python3"), GPU_CHECK_WHEELS=str(wheels), CUDA_HOME=str(tmp_path / "no"))
    subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), str(out)], env=env, capture_output=True,
                   timeout=120)
    summary = (out / "summary.txt").read_text().splitlines()
    stages = {line.split()[0]: line for line in summary[1:] if line.strip() and not line.startswith(("{", " "))}
    return stages, log.read_text().splitlines()


def test_builds_run_the_cli_through_the_given_python(offline_check):
    stages, calls = offline_check
    for name in ("build-default-fp16", "build-default-bf16"):
        assert stages[name].split()[1] == "ok", stages[name]
    assert any(c.startswith("-m speccompile.cli build") for c in calls), calls


def test_offline_tensorrt_install_asks_pip_for_nothing_unreachable(offline_check):
    """The wheelhouse's TensorRT wheels are installed by the install stage; install-tensorrt must not ask pip to
    resolve the extra (or build the package in isolation) with --no-index."""
    stages, calls = offline_check
    assert stages["install"].split()[1] == "ok", stages["install"]
    assert stages["install-tensorrt"].split()[1] == "ok", stages["install-tensorrt"]
