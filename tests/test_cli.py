"""The ``pagetable`` command line, run as a user runs it: a child process, outside the tree.

Bad values end the run before any work with one ``error:`` line and status 2; the help
lists the commands; a closed stdout ends the run quietly; the progress bar draws only on
a terminal and never wider than it; the simulation summary tells the truth about small
pools and small batches.
"""

import io
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import child_env

from pagetable.cli import _progress, bench, main


def run_cli(args, cwd, **kwargs):
    return subprocess.run([sys.executable, "-m", "pagetable", *args], capture_output=True, text=True,
                          cwd=cwd, env=child_env(), timeout=120, **kwargs)


def assert_refused(result):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pagetable") and "error:" in lines[0], \
        result.stderr
    assert lines[0].endswith("--help`)"), lines[0]     # where to read the usage
    assert result.stdout == ""
    return lines[0].rsplit(" (see `", 1)[0]


BAD_VALUES = [
    ["simulate", "--rate", "inf"],
    ["simulate", "--rate", "nan"],
    ["simulate", "--rate", "0"],
    ["simulate", "--rate", "-1"],
    ["simulate", "--seed", "-1"],
    ["simulate", "--steps", "0"],
    ["simulate", "--steps", "10000000000"],
    ["simulate", "--steps", "1.5"],
    ["simulate", "--n", "0"],
    ["simulate", "--n", "4", "--max-batch", "2"],
    ["simulate", "--block-size", "0"],
    ["simulate", "--block-size", "4294967296"],
    ["simulate", "--num-blocks", "-3"],
    ["simulate", "--num-blocks", "1"],
    ["simulate", "--num-blocks", "100000000000"],
    ["simulate", "--max-batch", "0"],
    ["simulate", "--rate", "10000", "--steps", "1000000"],
    ["simulate", "--workload", "nope"],
    # The offending option first: the test looks for it in the error line.
    ["simulate", "--turns", "0", "--workload", "shared-prefix"],
    ["simulate", "--turns", "17", "--workload", "shared-prefix"],
    ["simulate", "--system-prompts", "0", "--workload", "shared-prefix"],
    ["simulate", "--system-prompt-tokens", "0", "--workload", "shared-prefix"],
    ["simulate", "--system-prompt-tokens", "5000", "--workload", "shared-prefix"],
    ["simulate", "--system-prompts", "3"],                     # sharegpt has none
    ["simulate", "--hash-algorithm", "sha256"],                # without --prefix-caching
    ["simulate", "--hash-algorithm", "md5", "--prefix-caching"],
    ["simulate", "--rate", "2000", "--steps", "1000", "--workload", "shared-prefix"],   # token ids
    ["simulate", "--num-blocks", "64", "--workload", "shared-prefix", "--system-prompt-tokens", "4096"],
    ["demo", "--seed", "-1"],
    ["demo", "--block-size", "0"],
    ["demo", "--sequences", "0"],
    ["demo", "--sequences", "1000000000"],
]


@pytest.mark.parametrize("args", BAD_VALUES, ids=" ".join)
def test_a_bad_value_is_one_error_line_and_status_2(args, capsys):
    # In this process, for speed (the next test runs the same refusals as a user does).
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 2
    captured = capsys.readouterr()
    line = assert_refused(subprocess.CompletedProcess(args, 2, captured.out, captured.err))
    option = next(a for a in args if a.startswith("--"))
    assert option in line, line


@pytest.mark.parametrize("args", [["simulate", "--rate", "inf"], ["simulate", "--seed", "-1"],
                                  ["demo", "--seed", "-1"], ["demo", "--block-size", "0"]],
                         ids=" ".join)
def test_a_bad_value_in_a_child_process(args, tmp_path):
    assert_refused(run_cli(args, tmp_path))


@pytest.mark.parametrize("command", ["simulate", "bench"])
@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_an_unwritable_output_is_refused_before_the_run(command, option, tmp_path):
    missing = str(tmp_path / "no such folder" / "out")
    assert "no folder" in assert_refused(run_cli([command, option, missing], tmp_path))
    with pytest.raises(SystemExit) as exit:
        main([command, option, str(tmp_path)])   # a folder
    assert exit.value.code == 2
    assert list(tmp_path.iterdir()) == []


def test_help_lists_every_command_in_one_line(tmp_path):
    result = run_cli(["--help"], tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("usage: pagetable ")
    lines = result.stdout.splitlines()
    for command in ("demo", "simulate", "bench"):
        assert any(line.split()[:1] == [command] for line in lines), result.stdout
    assert "``" not in result.stdout and ":mod:" not in result.stdout


def test_an_unknown_command_is_named(tmp_path):
    result = run_cli(["foo"], tmp_path)
    line = assert_refused(result)
    assert line == "pagetable: error: unknown command 'foo' (choose from demo, simulate, bench)"


def test_a_closed_stdout_ends_quietly(tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)   # as `pagetable demo | head -1` once head has exited
    try:
        result = subprocess.run([sys.executable, "-m", "pagetable", "demo", "--sequences", "64"],
                                stdout=write_end, stderr=subprocess.PIPE, text=True,
                                cwd=tmp_path, env=child_env(), timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 141 and result.stderr == ""


def test_demo_runs(tmp_path):
    result = run_cli(["demo", "--sequences", "64", "--block-size", "3"], tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    assert "decode step slot mapping: 64 tokens" in result.stdout


# ----------------------------------------------------------------------- progress bar


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("width", [80, 40])
def test_progress_redraws_in_place_within_the_width(width, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(width))
    stream = FakeTerminal()
    progress = _progress.Progress(1000, "steps", stream=stream, interval=0)
    for done in range(1, 1001, 37):
        progress.update(done, "running 256 waiting 1024 free blocks 7168 and some more text")
    progress.update(1000)
    progress.close()
    written = stream.getvalue()
    assert "\n" not in written   # nothing scrolls
    draws = written.split("\r")[1:]
    assert len(draws) == len(range(1, 1001, 37)) + 2
    for draw in draws:
        assert draw.endswith(_progress.CLEAR_TO_END)
        assert len(draw) - len(_progress.CLEAR_TO_END) <= width - 1, draw
    assert "ETA" in draws[1] and draws[-1] == _progress.CLEAR_TO_END   # erased at the end


def test_progress_draws_nothing_off_a_terminal():
    stream = io.StringIO()
    progress = _progress.Progress(10, stream=stream, interval=0)
    for done in range(11):
        progress.update(done)
    progress.close()
    assert stream.getvalue() == ""


def test_simulate_on_a_pipe_prints_no_progress(tmp_path):
    result = run_cli(["simulate", "--steps", "30", "--no-reference"], tmp_path)
    assert result.returncode == 0 and result.stderr == ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pseudo-terminal")
def test_simulate_on_a_terminal_redraws_one_line(tmp_path):
    import pty
    import select

    master, slave = pty.openpty()
    env = dict(child_env(), COLUMNS="40")
    process = subprocess.Popen([sys.executable, "-m", "pagetable", "simulate", "--steps", "400",
                                "--no-reference"], stdout=subprocess.PIPE, stderr=slave,
                               cwd=tmp_path, env=env)
    os.close(slave)
    chunks = []
    while True:   # read as it comes, so that the terminal's buffer never fills
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:   # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif process.poll() is not None:
            break
    stdout = process.communicate(timeout=120)[0]
    os.close(master)
    assert process.returncode == 0
    drawn = b"".join(chunks).decode()
    assert drawn and "\n" not in drawn
    for draw in drawn.split("\r")[1:]:
        assert len(draw.replace(_progress.CLEAR_TO_END, "")) <= 39, draw
    assert b"pagetable simulate:" in stdout


# ----------------------------------------------------------------------- simulation summary


def test_the_summary_uses_the_real_max_batch(tmp_path):
    out = tmp_path / "figures.json"
    result = run_cli(["simulate", "--steps", "80", "--rate", "2", "--max-batch", "8", "--json", str(out)],
                     tmp_path)
    assert result.returncode == 0, result.stderr
    # The default max batch appears nowhere (the JSON's path, which may hold any number,
    # is left out: pytest numbers its temporary folders; so are the timings, decimals
    # such as 256.3 us, while every count the summary prints is a whole number).
    assert "256" not in re.sub(r"\d+\.\d+", "", result.stdout.replace(str(out), ""))
    assert "steps at 8 (max batch)" in result.stdout and "at 8 running" in result.stdout
    figures = json.loads(out.read_text())
    assert figures["max_batch"] == 8 and figures["steps_at_max_batch"] > 0
    assert "at_max_batch" in figures and not any("256" in key for key in figures)


def test_a_thrashing_pool_is_called_so(tmp_path):
    result = run_cli(["simulate", "--num-blocks", "8", "--steps", "150", "--no-reference"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning: the pool thrashes" in result.stdout


def test_the_default_pool_does_not_warn(tmp_path):
    result = run_cli(["simulate", "--steps", "150", "--no-reference"], tmp_path)
    assert result.returncode == 0 and "warning" not in result.stdout


@pytest.mark.parametrize("blocks", ["1", "2"])
def test_a_pool_too_small_for_any_request_is_refused_without_nan(blocks, tmp_path):
    result = run_cli(["simulate", "--num-blocks", blocks], tmp_path)
    line = assert_refused(result)
    assert "cannot hold any request" in line and "nan" not in result.stderr


def test_the_smallest_pool_that_runs_prints_no_nan(tmp_path):
    out = tmp_path / "figures.json"
    result = run_cli(["simulate", "--num-blocks", "3", "--steps", "60", "--json", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "nan" not in result.stdout.lower()
    json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))


# ----------------------------------------------------------------------- bench


def test_the_bench_table_fits_in_100_columns(monkeypatch):
    """Every row the bench makes, on tiny settings; the memory readings are stood in for."""
    def reading(table_kind, build, use_tracemalloc=False, timeout=300):
        per_block = {"pagetable": 8.25, "dict_of_lists": 123.4}[table_kind]
        return {"blocks": 534_659, "rss_per_block": per_block, "peak_rss_per_block": per_block,
                "traced_per_block": per_block}

    monkeypatch.setattr(bench._memory, "measure_memory", reading)
    settings = dict(bench.QUICK, repeats=1, min_sample=1e-5, queries=100, append_blocks_per_sequence=2,
                    engine_repeats=1, serving_steps=5)
    progress = _progress.Progress(1, enabled=False)
    rows, _ = bench.measure(settings, memory=True, with_sweep=False, progress=progress)
    table = bench.format_table(rows)
    assert len(rows) > 20
    for line in table.splitlines():
        assert len(line) <= 100, line


# ----------------------------------------------------------------------- prefix caching


def test_the_best_hits_of_a_hand_built_trace():
    from pagetable.cli._best_hits import best_hits

    trace = [
        ([1, 2, 3, 4, 5], [[6, 7, 8]]),        # nothing cached yet
        ([1, 2, 3, 4, 5, 6, 7, 8, 9], [[]]),   # the whole of the first request's 4 blocks
        ([1, 2, 3, 4], [[]]),                  # capped at (4 - 1) // 2 = 1 block
        ([9, 9, 3, 4, 5, 6], [[]]),            # [3, 4] is cached, but under another parent
        ([1, 2, 9, 9, 5, 6], [[]]),            # [1, 2] only
        ([1, 2, 9, 9, 5, 6, 0], [[]]),         # the chain the request before stored
        ([], [[]]),                            # an empty prompt hits nothing
        ([1], [[2]]),                          # neither does a one-token one
        ([4, 4, 4], [[5], [6]]),               # two samples, two different second blocks
        ([4, 4, 4, 6, 1], [[]]),               # sample 1's sequence, capped at 2 blocks
        ([4, 4, 4, 5], [[]]),                  # sample 0's, capped at 1 block
    ]
    bound = best_hits(2, trace)
    assert bound.per_request == [0, 8, 2, 0, 2, 6, 0, 0, 0, 4, 2]
    assert bound.requests == len(trace)
    assert bound.queries == sum(len(prompt) for prompt, _ in trace)
    assert bound.hits == 24 and bound.hit_blocks == 12
    assert bound.hit_rate == 24 / bound.queries


def test_the_best_hits_of_a_block_size_of_one():
    from pagetable.cli._best_hits import best_hits

    bound = best_hits(1, [([7, 8, 9], [[10]]), ([7, 8, 9, 10, 11], [[]]), ([7, 8], [[]])])
    assert bound.per_request == [0, 4, 1]


def test_the_shared_prefix_workload_is_seeded_and_resends_its_history():
    from pagetable.cli import workloads

    first = workloads.shared_prefix_requests(300, 1.0, 2, seed=3)
    again = workloads.shared_prefix_requests(300, 1.0, 2, seed=3)
    other = workloads.shared_prefix_requests(300, 1.0, 2, seed=4)
    assert len(first) == len(again) and all(
        np.array_equal(a.prompt, b.prompt) and all(np.array_equal(x, y) for x, y in zip(a.outputs, b.outputs))
        for a, b in zip(first, again))
    assert not all(np.array_equal(a.prompt, b.prompt) for a, b in zip(first, other))
    system = {turn.prompt[:1024].tobytes() for turn in first}
    assert 1 < len(system) <= 4            # a few system prompts, shared by every conversation
    follow_ups = 0
    for index, turn in enumerate(first):
        assert len(turn.outputs) == 2 and turn.prompt.size + max(o.size for o in turn.outputs) <= 8192
        assert ((turn.arrival >= 0) == (turn.turn == 0)) and (turn.think > 0) == (turn.turn > 0)
        assert 0 <= turn.prompt.min() and turn.prompt.max() < workloads.VOCAB_SIZE
        if turn.next >= 0:
            follow_up = first[turn.next]
            assert turn.next > index and follow_up.conversation == turn.conversation
            assert follow_up.turn == turn.turn + 1
            history = np.concatenate([turn.prompt, turn.outputs[0]])
            assert follow_up.prompt.size > history.size
            assert np.array_equal(follow_up.prompt[:history.size], history)
            follow_ups += 1
    assert follow_ups > 0


def test_shared_prefix_without_caching_hits_nothing_and_names_the_best(tmp_path):
    out = tmp_path / "figures.json"
    result = run_cli(["simulate", "--workload", "shared-prefix", "--steps", "120", "--rate", "2",
                      "--system-prompt-tokens", "256", "--json", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr
    cache = json.loads(out.read_text())["prefix_cache"]
    assert cache["enabled"] is False and cache["hit_rate"] == 0.0 and cache["hit_tokens"] == 0
    assert cache["prefill_tokens_saved"] == 0 and cache["evictions"] == 0 and cache["manager_stats"] is None
    # Every conversation starts from one of four system prompts of 16 blocks: after the
    # first four requests, each hits at least those.
    assert cache["requests"] > 8 and cache["best_hit_tokens"] >= 256 * (cache["requests"] - 4)
    assert 0 < cache["best_hit_rate"] < 1
    assert "prefix cache       off" in result.stdout and "best possible on this trace" in result.stdout


def test_a_workload_without_token_ids_reports_no_best(tmp_path):
    out = tmp_path / "figures.json"
    result = run_cli(["simulate", "--steps", "40", "--no-reference", "--json", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr
    cache = json.loads(out.read_text())["prefix_cache"]
    assert cache["best_hit_rate"] is None and cache["hit_rate"] == 0.0
    assert "prefix cache" not in result.stdout


def _caching_run(tmp_path, *extra):
    out = tmp_path / "figures.json"
    result = run_cli(["simulate", "--workload", "shared-prefix", "--prefix-caching", "--steps", "150",
                      "--rate", "2", "--system-prompt-tokens", "256", "--json", str(out), *extra], tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout, json.loads(out.read_text())


def _reference_caches():
    from pagetable.reference import ReferenceKVCacheManager

    try:
        ReferenceKVCacheManager(1, 1, enable_prefix_caching=True)
    except TypeError:
        return False
    return True


@pytest.mark.skipif(not _reference_caches(), reason="the reference model has no prefix caching in this build")
def test_prefix_caching_is_checked_against_the_reference_every_step(tmp_path):
    # A short pool: evictions, preemptions and re-admissions all happen.
    printed, figures = _caching_run(tmp_path, "--num-blocks", "150", "--n", "2")
    assert figures["checked_equal"] and "results checked equal every step" in printed
    assert figures["prefix_cache"]["evictions"] > 0 and figures["preemptions"] > 0 and figures["copies"] > 0


def test_prefix_caching_without_a_caching_reference_is_refused(tmp_path, monkeypatch):
    from pagetable.cli import simulate

    class Plain:
        def __init__(self, num_blocks, block_size):
            pass

    monkeypatch.setattr(simulate, "ReferenceKVCacheManager", Plain)
    with pytest.raises(SystemExit) as exit:
        main(["simulate", "--prefix-caching", "--steps", "5"])
    assert exit.value.code == 2


def test_prefix_caching_figures_are_consistent_under_eviction(tmp_path):
    printed, figures = _caching_run(tmp_path, "--num-blocks", "150", "--no-reference")
    cache = figures["prefix_cache"]
    assert cache["enabled"] and cache["hash_algorithm"] == "sha256"
    assert cache["evictions"] > 0
    assert 0 < cache["hit_tokens"] <= cache["best_hit_tokens"] <= cache["prompt_tokens"]
    assert 0 < cache["hit_rate"] <= cache["best_hit_rate"] < 1
    assert cache["hit_rate"] == cache["hit_tokens"] / cache["prompt_tokens"]
    assert cache["hit_tokens"] % 16 == 0 and cache["best_hit_tokens"] % 16 == 0
    # Saved counts every admission, re-admissions too; the manager counts every lookup.
    assert cache["prefill_tokens_saved"] >= cache["hit_tokens"]
    assert cache["blocks_saved"] == cache["prefill_tokens_saved"] // 16
    stats = cache["manager_stats"]
    assert stats["evictions"] == cache["evictions"]
    assert stats["requests"] >= figures["admitted"] >= cache["requests"]
    assert stats["hits"] >= cache["prefill_tokens_saved"] and stats["queries"] >= cache["prompt_tokens"]
    assert "best possible on this trace" in printed and "evictions" in printed


def test_without_eviction_the_best_hit_rate_is_reached(tmp_path):
    # Nothing is evicted and a turn is sent only after the answer before it is done, so
    # every block the bound counts is in the cache when it is looked up.
    printed, figures = _caching_run(tmp_path, "--num-blocks", "20000", "--no-reference")
    cache = figures["prefix_cache"]
    assert cache["evictions"] == 0 and figures["preemptions"] == 0
    assert cache["hit_tokens"] == cache["best_hit_tokens"] > 0


def test_random_token_ids_share_nothing(tmp_path):
    out = tmp_path / "figures.json"
    result = run_cli(["simulate", "--prefix-caching", "--steps", "60", "--rate", "2", "--no-reference",
                      "--json", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr
    cache = json.loads(out.read_text())["prefix_cache"]
    assert cache["enabled"] and cache["requests"] > 0
    assert cache["hit_rate"] == 0.0 and cache["best_hit_rate"] == 0.0 and cache["manager_stats"]["hits"] == 0


# --model hybrid, --spec-decode, --kernel-block-size (docs/HYBRID.md)
def _has_group_hooks(manager_class):
    return all(hasattr(manager_class, hook) for hook in ("_hit_mask", "_admission_plan", "_append_plan",
                                                         "_truncate_check", "rollback"))


def _cython_has_group_hooks():
    from pagetable import KVCacheManager
    return _has_group_hooks(KVCacheManager)


def _reference_has_group_hooks():
    from pagetable.reference import ReferenceKVCacheManager
    return _has_group_hooks(ReferenceKVCacheManager)


HYBRID_RUN = ["simulate", "--model", "hybrid", "--window", "64", "--workload", "shared-prefix",
              "--prefix-caching", "--steps", "40", "--rate", "2", "--spec-decode", "2", "--accept-rate", "0.5",
              "--quiet"]


def _check_hybrid_figures(printed, figures):
    assert figures["checked_equal"] and "results checked equal every step" in printed
    hybrid, spec = figures["hybrid"], figures["spec_decode"]
    per = hybrid["blocks_per_request"]
    # A 64-token window holds at most ceil(63 / 16) + 2 blocks per sequence, plus drafts.
    assert 0 < per["window"] < per["full"]
    assert hybrid["memory_vs_all_full"] < 1 and hybrid["blocks_released_by_window"] > 0
    assert hybrid["prefix_hit_rate"]["full"] == hybrid["prefix_hit_rate"]["window"] > 0
    assert spec["draft_slots"] == spec["rolled_back"] + spec["accepted"] > 0
    assert "layer-blocks" in printed and "rolled back" in printed


@pytest.mark.skipif(not _cython_has_group_hooks(), reason="Cython manager lacks the group hooks")
def test_hybrid_simulation_is_checked_against_the_reference_every_step(tmp_path):
    out = tmp_path / "figures.json"
    result = run_cli([*HYBRID_RUN, "--json", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr
    _check_hybrid_figures(result.stdout, json.loads(out.read_text()))


@pytest.mark.skipif(not _reference_has_group_hooks(), reason="reference manager lacks the group hooks")
def test_hybrid_simulation_reference_over_reference(tmp_path, monkeypatch, capsys):
    # The simulation's own logic, with the reference standing in for the Cython manager.
    from pagetable.cli import simulate
    from pagetable.reference import ReferenceKVCacheManager

    monkeypatch.setattr(simulate, "KVCacheManager", ReferenceKVCacheManager)
    out = tmp_path / "figures.json"
    assert main([*HYBRID_RUN, "--json", str(out)]) == 0
    _check_hybrid_figures(capsys.readouterr().out, json.loads(out.read_text()))


@pytest.mark.parametrize("args, says", [
    (["--window", "64"], "--window needs --model hybrid"),
    (["--window-ratio", "3"], "--window-ratio needs --model hybrid"),
    (["--accept-rate", "0.5"], "--accept-rate needs --spec-decode"),
    (["--kernel-block-size", "3"], "must divide --block-size"),
    (["--spec-decode", "-1"], "--spec-decode"),
    (["--spec-decode", "2", "--accept-rate", "0"], "--accept-rate"),
    (["--model", "mixed"], "--model"),
])
def test_hybrid_and_speculative_options_are_refused_before_any_work(tmp_path, args, says):
    assert says in assert_refused(run_cli(["simulate", *args], tmp_path))
