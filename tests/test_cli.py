"""The command line: plan output, reports, exit codes and one-line errors, as a user sees them."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import leftovers, make_adapter, read_tensors, same_bytes, tree_hash
from lorafuse.cli import main


@pytest.fixture(scope="module")
def llama(tiny_base, artefacts):
    from peft import LoraConfig

    base = tiny_base("llama", "bf16")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    adapter = artefacts.get("cli-adapter", lambda d: make_adapter(base, d, config))
    return base, adapter


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, match):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorafuse: error: ") and match in lines[0], err
    assert "Traceback" not in err


def test_plan_prints_matches_costs_and_writes_nothing(llama, tmp_path, capsys):
    base, adapter = llama
    code, out, _ = run(capsys, "plan", base, adapter, tmp_path / "out", "--verbose")
    assert code == 0
    assert "changes  6 base tensors: 6 lora" in out
    assert "model.layers.1.mlp.down_proj.weight: lora" in out
    assert "memory" in out and "disk     needs" in out
    assert not (tmp_path / "out").exists()


def test_plan_lists_the_low_disk_modes_only_where_they_help(llama, tmp_path, capsys, monkeypatch):
    """For a base on the disk, --low-disk saves nothing; --low-disk --push-to-hub (each uploaded shard
    deleted) is worth a line only when the output does not fit the free disk."""
    import shutil

    base, adapter = llama
    argv = ["plan", base, adapter, tmp_path / "out", "--max-shard-size", "20KB"]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "disk     needs" in out and "--low-disk" not in out
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=30_000))
    code, out, _ = run(capsys, *argv)
    assert code == 2 and "--low-disk --push-to-hub: " in out and "--low-disk: " not in out  # 2: it will not fit


def test_plan_json(llama, capsys):
    base, adapter = llama
    code, out, _ = run(capsys, "plan", base, adapter, "--json")
    plan = json.loads(out)
    assert code == 0 and len(plan["changed"]) == 6 and plan["shards"][0]["file"] == "model.safetensors"


def test_merge_json_report_and_plain_progress(llama, tmp_path, capsys):
    base, adapter = llama
    code, out, err = run(capsys, "merge", base, adapter, tmp_path / "out", "--json")
    report = json.loads(out)
    assert code == 0 and report["tensors_merged"] == 6 and report["tensors_copied"] > 0
    assert report["bytes_written"] == sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors")) - _headers(tmp_path / "out")
    code, _, err = run(capsys, "merge", base, adapter, tmp_path / "out2", "--max-shard-size", "20KB")
    assert code == 0 and "progress 100%" in err and "done" in err  # not a terminal: plain lines
    assert read_tensors(tmp_path / "out2").keys() == read_tensors(tmp_path / "out").keys()


def _headers(folder: Path) -> int:
    return sum(8 + int.from_bytes(p.read_bytes()[:8], "little") for p in folder.glob("*.safetensors"))


@pytest.mark.parametrize("args, match", [
    (("merge", "{base}", "{tmp}/missing", "{tmp}/out"), "does not exist"),
    (("merge", "{base}", "{adapter}", "{tmp}/out", "--max-shard-size", "huge"), "is not a size"),
    (("merge", "{base}", "{adapter}", "{tmp}/out", "--device", "cuda:0"), "cuda"),
    (("merge", "{base}", "{adapter}", "{tmp}/nope/out"), "does not exist"),
    (("merge", "{base}", "{adapter}", "{base}/out"), "overlaps the base model folder"),
    (("plan", "{adapter}", "{adapter}"), "has no config.json"),
    (("merge", "{adapter}", "{base}", "{tmp}/out"), "look swapped: {adapter} is a PEFT adapter and {base} a model; the base comes first: lorafuse merge [BASE] ADAPTER OUT"),
    (("merge", "{base}", "{tmp}/out"), "{base} is a model (config.json, no adapter_config.json), not a PEFT adapter"),
    (("plan", "{base}"), "not a PEFT adapter; the base comes first"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(llama, tmp_path, capsys, args, match):
    base, adapter = llama
    if "cuda" in match and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    before = tree_hash(base), tree_hash(adapter)
    argv = [a.format(base=base, adapter=adapter, tmp=tmp_path) for a in args]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, match.format(base=base, adapter=adapter))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    assert (tree_hash(base), tree_hash(adapter)) == before


def test_base_defaults_to_the_one_the_adapter_names(llama, tmp_path, capsys):
    """PEFT records the base it was given (here a folder) in base_model_name_or_path."""
    base, adapter = llama
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    code, out, _ = run(capsys, "plan", adapter)
    assert code == 0 and f"base     {base}" in out
    assert run(capsys, "merge", adapter, tmp_path / "out", "--quiet")[0] == 0
    assert run(capsys, "merge", base, adapter, tmp_path / "out2", "--quiet")[0] == 0
    one, two = tree_hash(tmp_path / "out"), tree_hash(tmp_path / "out2")
    assert one["model.safetensors"] == two["model.safetensors"] and one["config.json"] == two["config.json"]


def test_existing_output_needs_force(llama, tmp_path, capsys):
    """--force is suggested for, and replaces, what lorafuse can tell is its own to replace: an earlier
    merge (re-merging into it) and an empty folder; a file added to an earlier merge since is the user's,
    so that merge is replaced no more, even with --force."""
    base, adapter = llama
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run(capsys, "merge", base, adapter, out)
    assert_one_line_error(code, err, f"{out} already exists (an empty folder); choose another or pass --force to replace it")
    assert list(out.iterdir()) == []
    assert run(capsys, "merge", base, adapter, out, "--force", "--quiet")[0] == 0
    code, _, err = run(capsys, "merge", base, adapter, out)
    assert_one_line_error(code, err, f"{out} already exists (an earlier merge); choose another or pass --force")
    (out / "notes.txt").write_text("added to the output")
    code, _, err = run(capsys, "merge", base, adapter, out, "--force", "--quiet")
    assert_one_line_error(code, err, "is an earlier merge, but notes.txt is not one of the files its "
                                     "lorafuse-manifest.json lists")
    assert (out / "notes.txt").read_text() == "added to the output"
    (out / "notes.txt").unlink()
    code, _, _ = run(capsys, "merge", base, adapter, out, "--force", "--quiet")
    assert code == 0 and (out / "model.safetensors").exists()
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("what", ["a folder of models and notes", "a model lorafuse did not write"])
@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
def test_force_never_replaces_a_folder_lorafuse_did_not_write(llama, tmp_path, capsys, what, force):
    """`lorafuse merge base adapter models` into a folder of the user's models and notes: --force used to
    be suggested, and then deleted them all. Only an earlier merge or an empty folder is replaced."""
    import shutil

    base, adapter = llama
    out = tmp_path / "models"
    if what.startswith("a folder"):
        shutil.copytree(base, out / "llama-a")
        (out / "README.txt").write_text("notes")
        match = f"output folder {out} holds README.txt, llama-a, and is not an earlier lorafuse merge"
    else:
        shutil.copytree(base, out)
        match = f"output folder {out} holds a model that lorafuse did not write"
    before = tree_hash(tmp_path)
    code, _, err = run(capsys, "merge", base, adapter, out, *(["--force"] if force else []))
    assert_one_line_error(code, err, match)
    assert "pass --force" not in err and err.rstrip().endswith("choose another output folder")
    assert tree_hash(tmp_path) == before and not leftovers(tmp_path)


def test_refuses_to_start_without_disk_space(llama, tmp_path, capsys, monkeypatch):
    import shutil

    base, adapter = llama
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    code, _, err = run(capsys, "merge", base, adapter, tmp_path / "out")
    assert_one_line_error(code, err, "free on the disk")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_pickle_adapter_is_read_with_weights_only(llama, tmp_path, capsys):
    """PEFT's adapter_model.bin (safe_serialization=False) merges exactly like the safetensors one."""
    from peft import LoraConfig

    base, _ = llama
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    adapter = make_adapter(base, tmp_path / "bin-adapter", config, seed=5)
    st = make_adapter(base, tmp_path / "st-adapter", config, seed=5)
    from safetensors.torch import load_file

    (adapter / "adapter_model.safetensors").unlink()
    torch.save(load_file(st / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    assert run(capsys, "merge", base, adapter, tmp_path / "a", "--quiet")[0] == 0
    assert run(capsys, "merge", base, st, tmp_path / "b", "--quiet")[0] == 0
    a, b = read_tensors(tmp_path / "a"), read_tensors(tmp_path / "b")
    assert all(same_bytes(a[k], b[k]) for k in b)


class _Exploit:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickle_with_code_is_refused(llama, tmp_path, capsys):
    base, adapter = llama
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    with open(evil / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Exploit()}, f)
    code, out, err = run(capsys, "merge", base, evil, tmp_path / "out")
    assert_one_line_error(code, err, "cannot be loaded safely")
    assert "pickle code ran" not in out + err


def test_demo_runs_from_the_installed_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lorafuse.cli", "demo"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "demo OK" in done.stdout



@pytest.mark.parametrize("kind", ["dangling link", "link to a folder", "file"])
@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
def test_an_out_that_is_a_link_or_a_file_is_refused_before_any_work(llama, tmp_path, capsys, kind, force):
    """A dangling link as OUT used to be found only by the final move, after the whole merge, every time."""
    base, adapter = llama
    out, target = tmp_path / "out", tmp_path / "target"
    if kind == "file":
        out.write_text("mine")
    else:
        out.symlink_to(target)
        if kind == "link to a folder":
            target.mkdir()
            (target / "keep.txt").write_text("mine")
    before = tree_hash(tmp_path)
    code, _, err = run(capsys, "merge", base, adapter, out, *(["--force"] if force else []))
    assert_one_line_error(code, err, "is not a folder; choose another" if kind == "file" else "is a symbolic link")
    assert "progress" not in err and tree_hash(tmp_path) == before and os.path.lexists(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] + (["target"] if kind == "link to a folder" else []))


@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
def test_a_forgotten_out_never_suggests_force_on_an_input(llama, tmp_path, capsys, force):
    """`lorafuse merge BASE ADAPTER`: the adapter is taken as OUT, which exists; --force is not the fix,
    and does not replace an adapter folder when given."""
    base, adapter = llama
    before = tree_hash(adapter)
    code, _, err = run(capsys, "merge", base, adapter, *(["--force"] if force else []))
    assert_one_line_error(code, err, "holds an adapter that lorafuse did not write: is it an input? OUT is the last path")
    assert "--force" not in err and tree_hash(adapter) == before


@pytest.mark.parametrize("given, match", [
    ("", "the output path is empty"),
    (".", "the output path '.' is {work}, the current folder or one above it"),
    ("./", "the output path './' is {work}, the current folder or one above it"),
    ("sub/..", "the output path 'sub/..' is {work}, the current folder or one above it"),
    ("{work}", "is {work}, the current folder or one above it"),
    ("..", "the output path '..' is {tmp}, the current folder or one above it"),
    ("/", "the output path '/' is /, the root folder"),
])
def test_an_out_that_is_empty_the_current_folder_or_above_it_is_refused(llama, tmp_path, capsys, monkeypatch, given, match):
    """`lorafuse merge base adapter ''` used to offer --force for the working folder, and `.` with --force
    merged, then failed to rename it ("Device or resource busy"), leaving `..lorafuse-partial` behind."""
    base, adapter = llama
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    before = tree_hash(tmp_path), sorted(p.name for p in tmp_path.iterdir())
    for argv in (("merge", base, adapter, given.format(work=work), "--force"), ("plan", base, adapter, given.format(work=work))):
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, match.format(work=work, tmp=tmp_path))
        assert (tree_hash(tmp_path), sorted(p.name for p in tmp_path.iterdir())) == before
        assert sorted(p.name for p in work.iterdir()) == ["sub"] and not leftovers(tmp_path) and not leftovers(work)


def test_out_is_taken_as_the_folder_the_kernel_names(llama, tmp_path, capsys, monkeypatch):
    """`a/link/../out` is the folder next to where the link leads, as `ls` and the kernel see it (lexical
    normalisation would write beside the link instead); a trailing slash names the folder itself."""
    base, adapter = llama
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "link").symlink_to(tmp_path / "real" / "deep")
    monkeypatch.chdir(tmp_path / "a")
    code, out, err = run(capsys, "merge", base, adapter, "link/../out/", "--json")
    assert code == 0, err
    assert json.loads(out)["out"] == str(tmp_path / "real" / "out") and (tmp_path / "real" / "out" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["link"] and not leftovers(tmp_path / "real")


def test_verify_refuses_an_empty_path(capsys):
    code, _, err = run(capsys, "verify", "")
    assert_one_line_error(code, err, "the folder to verify is empty; name it: lorafuse verify OUT")


@pytest.mark.parametrize("where", ["OUT", "ADAPTER"])
def test_a_newline_in_a_name_cannot_split_or_forge_a_line(llama, tmp_path, capsys, where):
    """Error messages name paths anyone may choose: control characters in them are written as escapes,
    so that every error is one line and none can print a `lorafuse: done OK` line of its own."""
    base, adapter = llama
    odd = tmp_path / "x\nlorafuse: done OK\r\x1b[2K"
    if where == "OUT":
        odd.write_text("a file where OUT goes")
        argv, match = ("merge", base, adapter, odd), "exists and is not a folder"
    else:
        argv, match = ("merge", base, odd, tmp_path / "out"), "does not exist"
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, match)
    assert "x\\nlorafuse: done OK\\r\\x1b[2K" in err and "\r" not in err and "\x1b" not in err


def test_verify_lists_each_problem_on_one_line(llama, tmp_path, capsys):
    """A stray file in OUT is named in its problem line: a newline in its name stays inside that line."""
    base, adapter = llama
    out = tmp_path / "out"
    assert run(capsys, "merge", base, adapter, out, "--quiet")[0] == 0
    (out / "stray\nlorafuse: done OK").write_text("")
    code, _, err = run(capsys, "verify", out)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 2 and lines[0].startswith("problem  stray\\nlorafuse: done OK is not listed")
    assert lines[1] == f"lorafuse: error: {out} failed verification with 1 problem(s), listed above"


def test_plan_that_will_not_fit_says_so_and_exits_2(llama, tmp_path, capsys, monkeypatch):
    import shutil

    from lorafuse.plan import DISK_MARGIN
    from lorafuse.units import human_size

    base, adapter = llama
    code, out, _ = run(capsys, "plan", base, adapter, tmp_path / "out", "--json")
    assert code == 0 and json.loads(out)["fits"] is True
    assert json.loads(run(capsys, "plan", base, adapter, "--json")[1])["fits"] is None  # no OUT: no disk to ask
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=DISK_MARGIN))  # the margin, no more
    code, out, err = run(capsys, "plan", base, adapter, tmp_path / "out")
    assert "disk     needs" in out  # the plan first, then why it will not fit
    assert_one_line_error(code, err, f"and {human_size(DISK_MARGIN)} to spare, but only {human_size(DISK_MARGIN)} is free")
    assert "it will not fit" in err
    code, out, err = run(capsys, "plan", base, adapter, tmp_path / "out", "--json")
    assert code == 2 and json.loads(out)["fits"] is False and not (tmp_path / "out").exists()


def _command(*argv, ready: int | None = None) -> list[str]:
    """The installed `lorafuse` command's own steps: import the entry point pyproject.toml names, call it.
    `ready`: a file descriptor to write a byte to once that module is imported."""
    module, function = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]["lorafuse"].split(":")
    code = (f"import os, sys; sys.argv[0] = 'lorafuse'; from {module} import {function} as main; "
            + (f"os.write({ready}, b'1'); " if ready is not None else "") + "sys.exit(main())")
    return [sys.executable, "-c", code, *map(str, argv)]


def _start_command(*argv) -> subprocess.Popen:
    """Start the command and return once its entry point's module is imported: the interpreter's start-up
    (site.py) and the search for that module are Python's to handle, everything from there on is lorafuse's."""
    ready, tell = os.pipe()
    process = subprocess.Popen(_command(*argv, ready=tell), pass_fds=(tell,),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(tell)
    assert os.read(ready, 1) == b"1"
    os.close(ready)
    return process


def test_ctrl_c_at_any_moment_is_one_line_and_exit_130(llama, tmp_path):
    """While modules import, the plan is made, the shards are written, and the interpreter shuts down: exit
    130 and one line with OUT untouched (or complete, as the line then says), or 0 with OUT complete. In its very last steps Python gives SIGINT
    back its default action, which ends the process (the shell shows 130 then too): silently, and only
    once the merge is complete."""
    base, adapter = llama
    start = time.monotonic()
    whole = _start_command("merge", base, adapter, tmp_path / "whole", "--quiet")
    assert whole.wait(timeout=120) == 0, whole.stderr.read()
    seconds = time.monotonic() - start
    delays = [i * 0.005 for i in range(31)] + [seconds * i / 10 for i in range(2, 13)]
    outcomes = []
    for i, delay in enumerate(delays):
        out = tmp_path / f"out{i}"
        process = _start_command("merge", base, adapter, out, "--quiet")
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        outcomes.append((delay, process.returncode, err, (out / "lorafuse-manifest.json").exists()))
    for delay, code, err, complete in outcomes:
        assert "Traceback" not in err and len(err.splitlines()) <= 1, (delay, code, err)
        if code == 130:  # complete only when the interrupt came once OUT was in place, which it says
            assert err.startswith("lorafuse: interrupted") and complete == ("was complete" in err), (delay, err)
        else:
            assert code in (0, -signal.SIGINT) and err == "" and complete, (delay, code, err)
    assert any(code == 130 for _, code, _, _ in outcomes)


def test_an_interrupted_command_does_not_wait_for_stuck_threads(llama, tmp_path):
    """A Ctrl-C that lands while the main thread imports a module can leave another thread's import of it
    waiting for good (as api's import thread did, now and then): the interrupted command ends all the same."""
    base, adapter = llama
    command = _command("merge", base, adapter, tmp_path / "out", "--max-shard-size", "20KB", "--quiet")
    command[2] = (
        "import os, signal, threading\n"
        "import lorafuse.execute as execute\n"
        "finish = execute._finish_shard\n"
        "def interrupting(*args):\n"
        "    threading.Thread(target=threading.Event().wait).start()\n"
        "    finish(*args)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "execute._finish_shard = interrupting\n"
    ) + command[2]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 130 and done.stderr.startswith("lorafuse: interrupted") and done.stderr.count("\n") == 1


def test_a_closed_pipe_is_a_normal_end(llama, tmp_path):
    """`lorafuse ... | head -1`: the reader has gone before anything is written; every command that prints on
    stdout still does its work and ends quietly with exit code 0, as when its output was read. With
    `2>&1 | head -1` the messages go unheard too, and the merge is not given up for them."""
    base, adapter = llama
    out = tmp_path / "out"
    cases = [(["merge", base, adapter, out, "--json"], False, 0), (["verify", out], False, 0),
             (["plan", base, adapter], False, 0), (["plan", base, adapter, "--json"], False, 0),
             (["inspect", base, adapter, "--json"], False, 0), (["--version"], False, 0), (["--help"], False, 0),
             (["merge", base, adapter, tmp_path / "logged"], True, 0),  # plan, progress and report unheard
             (["merge", base, adapter, out], True, 2)]  # OUT exists: the error is unheard, its exit code stands
    for argv, both, code in cases:
        reader, writer = os.pipe()
        os.close(reader)
        done = subprocess.run(_command(*argv), stdout=writer, stderr=writer if both else subprocess.PIPE,
                              text=True, timeout=300)
        os.close(writer)
        assert (done.returncode, done.stderr) == (code, None if both else ""), argv
    assert (out / "lorafuse-manifest.json").exists() and (tmp_path / "logged" / "lorafuse-manifest.json").exists()


def test_a_closed_stdout_is_no_error(llama, tmp_path):
    """`lorafuse ... >&-`: Python starts with sys.stdout None; every command still does its work, and says
    its messages on stderr, with no traceback (argparse writes --help and --version there then). With
    stderr closed too (`2>&-`), unheard."""
    base, adapter = llama
    out = tmp_path / "out"
    cases = [(["merge", base, adapter, out], ">&-", 0), (["verify", out, "--base", base, "--adapter", adapter], ">&-", 0),
             (["plan", base, adapter], ">&-", 0), (["inspect", base, adapter, "--json"], ">&-", 0),
             (["--version"], ">&-", 0), (["--help"], ">&-", 0), (["demo"], ">&-", 0),
             (["merge", base, adapter, tmp_path / "unheard"], ">&- 2>&-", 0),
             (["merge", base, adapter, out], ">&-", 2)]  # OUT exists: the one-line error on stderr
    for argv, closing, code in cases:
        done = subprocess.run(["bash", "-c", f'"$@" {closing}', "bash", *_command(*argv)], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == code and "Traceback" not in done.stderr and done.stdout == "", (argv, done.stderr)
        if code:
            assert done.stderr.startswith("lorafuse: error: output folder") and done.stderr.count("\n") == 1
    assert (out / "lorafuse-manifest.json").exists() and (tmp_path / "unheard" / "lorafuse-manifest.json").exists()


def test_closed_stdout_and_stderr_are_held_by_dev_null(llama, tmp_path):
    """Closed descriptors 1 and 2 would go to the first files the merge opens, and a C library's warning
    written there into a shard: /dev/null holds them while the command runs."""
    base, adapter = llama
    command = _command("merge", base, adapter, tmp_path / "out")
    command[2] = (
        "import os\n"
        "import lorafuse.cli\n"
        "merge = lorafuse.cli.merge\n"
        "def seen(*args, **kwargs):\n"
        "    os.write(3, ' '.join(os.readlink(f'/proc/self/fd/{fd}') for fd in (1, 2)).encode())\n"
        "    return merge(*args, **kwargs)\n"
        "lorafuse.cli.merge = seen\n"
    ) + command[2]
    reader, writer = os.pipe()
    done = subprocess.run(["bash", "-c", f'"$@" >&- 2>&- 3>&{writer}', "bash", *command], pass_fds=(writer,), timeout=300)
    os.close(writer)
    with os.fdopen(reader) as f:
        assert (done.returncode, f.read()) == (0, "/dev/null /dev/null")


def test_demo_into_a_closed_pipe_is_a_normal_end():
    """`lorafuse demo | head -1`: the demo prints through the command's own output, like every command."""
    done = subprocess.run(["bash", "-c", 'set -o pipefail; "$@" | head -1', "bash", *_command("demo")],
                          capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("built a tiny Llama-shaped bf16 model")


def test_plan_progress_and_report_count_bytes_alike(llama, tmp_path, capsys, monkeypatch):
    """Decimal units everywhere: the plan's and the report's kB, the plain progress lines and the tqdm bar
    on a terminal (which would read 2.4% low with kibibytes)."""
    from lorafuse import plan
    from lorafuse.units import human_size

    base, adapter = llama
    the_plan = plan(base, adapter)
    total = the_plan.total_size
    written = json.loads(run(capsys, "merge", base, adapter, tmp_path / "json", "--json")[1])["bytes_written"]
    code, _, err = run(capsys, "merge", base, adapter, tmp_path / "plain")
    assert code == 0
    assert f"output   1 shard(s), {human_size(the_plan.output_bytes)}" in err
    assert f"progress 100%  {human_size(total)} / {human_size(total)}, " in err
    assert f" copied, 0 cast, {human_size(written)} in " in err and "peak memory " in err

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = run(capsys, "merge", base, adapter, tmp_path / "bar")
    assert code == 0
    done, shown = re.findall(r"merging: 100%.*?\| *([0-9.]+)k/([0-9.]+)k ", err)[-1]
    assert abs(float(shown) * 1000 - total) <= 0.005 * total and shown == done


def test_inspect_and_plan_list_tensors_in_natural_order(tmp_path, capsys):
    """Twelve layers: layers.2 comes before layers.10 (as the model runs them), inspect's "overall" last."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, LlamaConfig

    from conftest import TINY, save_model

    base = save_model(AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY, "num_hidden_layers": 12})), tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    code, out, _ = run(capsys, "inspect", base, adapter, "--json")
    names = [row["name"] for row in json.loads(out)]
    assert code == 0 and names == [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(12)] + ["overall"]
    code, out, _ = run(capsys, "inspect", base, adapter)
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == names
    code, out, _ = run(capsys, "plan", base, adapter, "--verbose")
    assert code == 0 and [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  ")] == names[:-1]
