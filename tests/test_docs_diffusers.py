"""docs/distill_diffusers.md followed literally: every fenced block runs in order in one folder (YAML blocks are
written to the file the text names just before them, bash lines run as commands, Python blocks run as scripts and
the ``# ...`` lines after their last statement must equal what they print). To run in seconds, ``distill.py`` gets
``--trainer.max_steps 2`` and teacher sampling ``--n 8`` appended, as the page says."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "distill_diffusers.md"
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)
SMALL = {"scripts/distill.py": ["--trainer.max_steps", "2"], "teacher": ["--n", "8"]}


def blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, code, the prose just before it) of every fenced block, in order."""
    out, last = [], 0
    for m in FENCE.finditer(text):
        out.append((m.group(1), m.group(2), text[last : m.start()]))
        last = m.end()
    return out


def commands(code: str) -> list[list[str]]:
    """The bash block's commands (continuations joined, ``#`` comments and output lines dropped)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip() and line[0] != "#"]


def expected_output(code: str) -> list[str]:
    """The ``# ...`` lines after a Python block's last statement (its documented output)."""
    lines = code.rstrip().splitlines()
    tail = []
    while lines and lines[-1].startswith("# "):
        tail.insert(0, lines.pop()[2:])
    return tail


def small(cmd: list[str]) -> list[str]:
    if cmd[:2] == ["python", "scripts/distill.py"]:
        return cmd + SMALL["scripts/distill.py"]
    if cmd[:2] == ["python", "scripts/sample.py"] and not cmd[2].endswith(".safetensors"):
        return cmd + SMALL["teacher"]
    return cmd


@pytest.mark.slow
def test_the_page_runs_as_written(tmp_path):
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")
    env = {
        "PYTHONPATH": str(ROOT),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "WANDB_MODE": "disabled",
    }
    found = blocks(DOC.read_text())
    assert {lang for lang, _, _ in found} == {"python", "bash", "yaml"} and len(found) >= 12
    ran, timings = 0, []
    for lang, code, prose in found:
        t0 = time.time()
        if lang == "yaml":
            name = re.findall(r"`([\w.-]+\.yaml)`", prose)[-1]
            (tmp_path / name).write_text(code)
            continue
        if lang == "python":
            run = subprocess.run(
                [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
            )
            assert run.returncode == 0, f"python block failed:\n{code}\n{run.stderr[-2000:]}"
            want = expected_output(code)
            assert run.stdout.strip().splitlines()[-len(want) :] == want if want else True
            timings.append(("python", code.splitlines()[-1][:60], time.time() - t0))
        else:
            for cmd in commands(code):
                t0 = time.time()
                cmd = small(cmd)
                assert cmd[0] == "python", cmd
                run = subprocess.run(
                    [sys.executable, *cmd[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
                )
                assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}"
                timings.append(("bash", " ".join(cmd[1:3]), time.time() - t0))
        ran += 1
    for kind, what, seconds in timings:
        print(f"{seconds:6.1f} s  {kind}: {what}")
    assert ran >= 10
    assert (tmp_path / "runs/ft/pipeline/pipeline_flowmap.py").is_file()
    assert (tmp_path / "runs/lora/merged.safetensors").is_file() and (tmp_path / "edm_samples/samples.npz").is_file()
