import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO

SCRIPTS = REPO / "scripts"

KEEP_CHECK = textwrap.dedent(
    """
    import resource, sys, torch
    sys.path.insert(0, sys.argv[1])
    import bench_common
    print(bench_common.apply_heap("keep"))
    x = torch.randn(8 * 12 * 512, 512)  # 100 MB: glibc maps blocks this large afresh for every call by default
    faults = []
    for _ in range(15):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        out = torch.softmax(x, -1)
        del out
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(max(faults[-3:]))
    """
)


def load(name):
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap settings")
def test_kept_heap_reuses_pages_for_large_outputs():
    done = subprocess.run(
        [sys.executable, "-c", KEEP_CHECK, str(SCRIPTS)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    note, fault_count = done.stdout.strip().splitlines()
    if "needs glibc" in note:
        pytest.skip(note)
    assert "freed memory kept for reuse" in note
    # Once the heap has settled, outputs land on pages it already has; fresh ones would fault about 24,000 each.
    assert int(fault_count) < 100


def test_bench_rsoftmax_writes_its_table(tmp_path, monkeypatch):
    bench = load("bench_rsoftmax")
    monkeypatch.setattr(bench, "QUICK_SHAPES", [(2, 2, 8, 24)])
    bench.main(["--quick", "--repeats", "1", "--heap", "system", "--out", str(tmp_path)])
    table = (tmp_path / "bench_rsoftmax.md").read_text()
    assert "C library's defaults" in table
    assert (tmp_path / "bench_rsoftmax.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Both reports get the permissions a plain write would give, not those of the private temporary file.
    modes = {(tmp_path / name).stat().st_mode & 0o777 for name in ("bench_rsoftmax.md", "bench_rsoftmax.png")}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == {0o666 & ~umask}
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("tmp*"))
    rows = [line for line in table.splitlines() if line.startswith("| 2x2x8x24 |")]
    candidates = {line.split(" | ")[4] for line in rows}
    assert {"softmax", "rsoftmax[torch]"} <= candidates
    assert all(float(line.split(" | ")[7]) > 0 and int(line.split(" | ")[10].rstrip(" |")) >= 0 for line in rows)
    torch.set_num_threads(torch.get_num_threads())


@pytest.mark.parametrize("script", ["bench_rsoftmax", "bench_step"])
def test_output_folder_is_checked_before_any_work(script, tmp_path, capsys):
    a_file = tmp_path / "report"
    a_file.write_text("kept")
    with pytest.raises(SystemExit):
        load(script).main(["--out", str(a_file)])
    assert f"--out must be a folder, got {str(a_file)!r}, which is a file" in capsys.readouterr().err
    assert a_file.read_text() == "kept"
    with pytest.raises(SystemExit):
        load(script).main(["--out", str(a_file / "below")])
    assert "--out must be a folder" in capsys.readouterr().err


def test_heap_choice_is_checked():
    with pytest.raises(ValueError, match="--heap must be one of keep, system, got 'mmap'"):
        load("bench_common").apply_heap("mmap")


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("bench_rsoftmax", ["--repeats", "0"], "--repeats must be at least 1, got 0"),
        ("bench_step", ["--r", "1.5"], "--r must lie in [0, 1], got 1.5"),
        ("bench_step", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        ("bench_step", ["--length", "600"], "--length must lie in [2, 512]"),
        ("bench_step", ["--models", "minilm,gpt"], "--models must list minilm and/or bert-base"),
        ("bench_step", ["--models", "minilm,,minilm"], "once each"),
        ("bench_rsoftmax", ["--r", "0.3"], "unrecognized arguments: --r"),
        ("bench_step", ["--heap", "mmap"], "argument --heap: invalid choice: 'mmap'"),
    ],
)
def test_bad_benchmark_flags_are_refused_before_any_work(script, args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        load(script).main([*args, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
