"""Usage errors of the `moec` command line: every one is `moec: error: ...` with exit status 1,
never a traceback or an "internal error", and names the user's paths (never a temporary one)."""

from __future__ import annotations

import os
import re

import pytest
import torch
from moec.cli import main
from moec.driver import compile_model, task_count

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
MOMA = os.path.join(EXAMPLES, "moma.moe")
MIXTRAL = os.path.join(EXAMPLES, "mixtral.moe")
TASKS = os.path.join(EXAMPLES, "hls", "task_experts.moe")

TINY = """model tiny {
  input(dim = 8)
  block b { attention(heads = 2); moe { experts 2 x glu(8, 16); router top_k(k = 1) } }
  layers { b }
}
"""


def run(capsys, argv) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def user_error(rc: int, err: str) -> None:
    assert rc == 1, err
    assert "moec: error" in err, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert ".moec-" not in err, err  # never a temporary path


def tiny(tmp_path) -> str:
    path = tmp_path / "tiny.moe"
    path.write_text(TINY)
    return str(path)


# ---- models that route by task: training data and the MLIR export carry task ids ----------------
def test_task_count_of_the_graph():
    assert task_count(compile_model(TASKS).graph) == 3
    assert task_count(compile_model(TASKS, pipeline="unfused").graph) == 3
    assert task_count(compile_model(MIXTRAL).graph) is None


def test_train_a_task_routed_model_lowers_the_loss(tmp_path, capsys):
    profile = tmp_path / "routing.json"
    rc, out, err = run(capsys, ["train", TASKS, "--steps", "8", "--tokens", "128", "--profile", str(profile)])
    assert rc == 0, out + err
    assert "(down)" in out and "task ids 0..2" in out
    assert "internal error" not in err and profile.exists()


def test_synthetic_batches_carry_task_ids_only_when_the_model_takes_them():
    from moec.train import SyntheticTask

    x, modality, task, target = SyntheticTask(16, 2, seed=0, tasks=3).batch(4, 8)
    assert x.shape == target.shape == (4, 8, 16) and modality.shape == task.shape == (4, 8)
    assert int(task.min()) >= 0 and int(task.max()) < 3
    _, _, task, _ = SyntheticTask(16, 2, seed=0).batch(4, 8)
    assert task is None


def test_synthetic_target_is_the_per_modality_teacher():
    from moec.train import SyntheticTask

    data = SyntheticTask(8, 3, seed=1)
    x, modality, _, target = data.batch(2, 5)
    expected = torch.einsum("bsd,bsde->bse", torch.tanh(torch.einsum("bsd,bsde->bse", x, data.a[modality])),
                            data.b[modality])
    torch.testing.assert_close(target, expected)


@pytest.mark.parametrize("dialect", ["linalg", pytest.param("stablehlo", marks=pytest.mark.slow),
                                     pytest.param("tosa", marks=pytest.mark.slow)])
def test_task_routed_model_lowers_to_mlir_with_a_task_argument(tmp_path, capsys, dialect):
    pytest.importorskip("torch_mlir")
    out = tmp_path / "mlir"
    rc, _, err = run(capsys, ["compile", TASKS, "--target", "mlir", "--dialect", dialect, "-o", str(out)])
    assert rc == 0, err
    text = (out / "task_experts.mlir").read_text()
    main_sig = re.search(r"func\.func @main\(([^)]*)\)", text).group(1)
    # forward(x, modality, task): x [1, 8, 32], modality and task ids [1, 8]
    assert main_sig.count("%arg") == 3 and "%arg2: tensor<1x8xi64>" in main_sig, main_sig
    assert text.count("%arg2") > 1  # the task ids are read


def test_mlir_example_inputs_include_task_ids_when_asked():
    from moec.backends.mlir import example_inputs_for

    class Fake:
        d_model, modalities = 4, ("a", "b")

    assert len(example_inputs_for(Fake(), 2, 3)) == 2
    x, _, task = example_inputs_for(Fake(), 2, 3, tasks=2)
    assert x.shape == (2, 3, 4) and task.shape == (2, 3) and task.max() == 1


# ---- train: learning rate, token count, profile path -----------------------------------------------
@pytest.mark.parametrize("lr", ["-1", "0", "nan", "inf", "-inf", "abc"])
def test_train_refuses_a_bad_learning_rate(tmp_path, capsys, lr):
    rc, out, err = run(capsys, ["train", tiny(tmp_path), "--steps", "1", f"--lr={lr}"])
    user_error(rc, err)
    assert "--lr" in err and "step" not in out


def test_train_api_refuses_a_bad_learning_rate(tmp_path):
    import moec
    from moec.train import train

    model = moec.load(tiny(tmp_path))
    for lr in (float("nan"), float("inf"), -1.0, 0.0):
        with pytest.raises(ValueError, match="learning rate"):
            train(model, steps=1, tokens=8, lr=lr)


def test_train_says_when_the_loss_diverges(tmp_path, capsys):
    rc, _, err = run(capsys, ["train", tiny(tmp_path), "--steps", "3", "--tokens", "32", "--lr", "1e30"])
    user_error(rc, err)
    assert "not finite" in err and "--lr" in err


def test_train_refuses_more_tokens_than_memory_before_allocating(tmp_path, capsys):
    rc, out, err = run(capsys, ["train", tiny(tmp_path), "--steps", "1", "--tokens", "100000000000"])
    user_error(rc, err)
    assert "--tokens" in err and "GiB" in err and "memory" in err and "step" not in out


def test_train_reports_an_allocation_failure(tmp_path, capsys, monkeypatch):
    from moec import train as train_module

    def refuse(*_args, **_kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes.")

    monkeypatch.setattr(train_module, "train", refuse)
    rc, _, err = run(capsys, ["train", tiny(tmp_path), "--steps", "1"])
    user_error(rc, err)
    assert "out of memory" in err and "123 bytes" in err


@pytest.mark.parametrize("where", ["directory", "proc", "missing_parent", "empty"])
def test_train_checks_the_profile_path_before_training(tmp_path, capsys, where):
    if where == "proc" and not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc")
    profile = {"directory": str(tmp_path), "proc": "/proc/moec-profile.json",
               "missing_parent": str(tmp_path / "no" / "p.json"), "empty": ""}[where]
    rc, out, err = run(capsys, ["train", tiny(tmp_path), "--steps", "1", "--profile", profile])
    user_error(rc, err)
    assert "step" not in out  # refused before any training step
    assert where == "empty" or f"`{profile}`" in err or "no directory" in err


def test_profile_probe_leaves_no_file_and_keeps_an_existing_one(tmp_path):
    from moec.train import _profile_error

    fresh = tmp_path / "p.json"
    assert _profile_error(str(fresh)) is None and not fresh.exists()
    fresh.write_text("keep")
    assert _profile_error(str(fresh)) is None and fresh.read_text() == "keep"


# ---- compile -o ------------------------------------------------------------------------------------
def test_output_path_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "a.moe"
    target.write_text(TINY)
    rc, _, err = run(capsys, ["compile", MOMA, "-o", str(target)])
    user_error(rc, err)
    assert f"output path `{target}` exists and is not a directory" in err
    assert target.read_text() == TINY
    rc, _, err = run(capsys, ["compile", MOMA, "-o", str(target / "sub")])
    user_error(rc, err)
    assert f"`{target}` is not a directory" in err


@pytest.mark.parametrize("out", ["/proc", "/proc/moec-out", "/proc/moec-out/deeper"])
def test_output_directory_that_cannot_be_written(capsys, out):
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc")
    rc, _, err = run(capsys, ["compile", MOMA, "-o", out])
    user_error(rc, err)
    assert f"cannot write the output directory `{out}`" in err


def test_empty_output_path_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["compile", MOMA, "-o", ""], ["place", MOMA, "-n", "2", "-o", ""]):
        rc, _, err = run(capsys, argv)
        user_error(rc, err)
        assert "empty path" in err
    assert os.listdir(tmp_path) == []


def test_write_tree_into_an_existing_directory_leaves_no_temporary(tmp_path):
    from moec.backends import write_tree

    out = tmp_path / "out"
    assert write_tree(str(out), {"a.txt": "1", "d/b.txt": "2"}) == ["a.txt", "d/b.txt"]
    (out / "keep.txt").write_text("k")
    assert write_tree(str(out), {"a.txt": "3"}) == ["a.txt"]
    assert sorted(os.listdir(out)) == ["a.txt", "d", "keep.txt"] and (out / "a.txt").read_text() == "3"
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ---- check on a file without a model -----------------------------------------------------------------
@pytest.mark.parametrize("content", ["", "# only a comment\n\n# and another\n"])
def test_check_of_a_file_without_anything_is_the_no_model_error(tmp_path, capsys, content):
    path = tmp_path / "empty.moe"
    path.write_text(content)
    rc, out, check_err = run(capsys, ["check", str(path)])
    assert rc == 1 and "ok" not in out
    rc2, _, compile_err = run(capsys, ["compile", str(path), "-o", str(tmp_path / "o")])
    assert rc2 == 1
    for err in (check_err, compile_err):
        assert "error[E0211]" in err and "defines no model" in err


def test_check_of_a_file_of_definitions_to_import_is_ok(tmp_path, capsys):
    path = tmp_path / "common.moe"
    path.write_text("const d = 8\nexpert ffn = glu(d, 16)\n")
    rc, out, err = run(capsys, ["check", str(path)])
    assert (rc, out, err) == (0, f"{path}: ok\n", "")


# ---- csim inputs -------------------------------------------------------------------------------------
def test_csim_input_without_tokens(tmp_path, capsys):
    np = pytest.importorskip("numpy")
    for shape in ((0, 64), (0, 4, 64), (2, 0, 64)):
        path = tmp_path / "x.npy"
        np.save(path, np.zeros(shape, dtype=np.float32))
        rc, _, err = run(capsys, ["csim", MIXTRAL, "--input", str(path)])
        user_error(rc, err)
        assert "input has no tokens" in err and "modality" not in err


def test_csim_task_ids_for_a_model_without_task_routing(tmp_path, capsys):
    np = pytest.importorskip("numpy")
    path = tmp_path / "t.npy"
    np.save(path, np.zeros(16, dtype=np.int64))
    rc, _, err = run(capsys, ["csim", MIXTRAL, "--task", str(path)])
    user_error(rc, err)
    assert "does not route by task" in err and "--task" in err


# ---- ir --after 'pass{option=value}' -------------------------------------------------------------
@pytest.mark.parametrize(("after", "message"), [
    ("fuse-permute{block-m=abc}", "block-m must be an integer, got `abc`"),
    ("fuse-permute{block-m=1.5}", "block-m must be an integer"),
    ("fuse-permute{block-m=99999999999999999999999}", "block-m must be at most 4096"),
    ("fuse-permute{block-m=4097}", "block-m must be at most 4096"),
    ("fuse-permute{block-m=0}", "block-m must be positive"),
    ("fuse-permute{block-m=}", "needs a value"),
    ("place-experts{devices=abc}", "devices must be an integer"),
    ("place-experts{devices=2,redundant=-1}", "redundant must be non-negative"),
    ("place-experts{devices=2,bytes-per-param=0}", "bytes-per-param must be positive"),
    ("place-experts{devices=2,method=nope}", "unknown placement method"),
    ("place-experts{devices=2,profile=/nonexistent/profile.json}", "cannot read routing profile"),
    ("analyze{args=1}", "has no option `args`"),
])
def test_bad_pass_options(capsys, after, message):
    rc, _, err = run(capsys, ["ir", MIXTRAL, "--after", after])
    assert rc == 1, err
    assert "error[E0402]" in err and message in err, err
    assert "Traceback" not in err and "internal error" not in err and "not supported between" not in err


@pytest.mark.parametrize("after", ["fuse-permute{block-m=4096}", "fuse-permute{block-m=+8}",
                                   "place-experts{devices=2,memory=80GB}", "place-experts{devices=2,memory=85899345920}"])
def test_good_pass_options(capsys, after):
    rc, out, err = run(capsys, ["ir", MIXTRAL, "--after", after])
    assert rc == 0, err
    assert "output(" in out


# ---- argparse errors follow the same convention: `moec: error:` and exit 1 ---------------------------
@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["compile", MOMA], ["train", MOMA, "--steps", "0"],
                                  ["train", MOMA, "--steps", "x"], ["check"], ["ir", MOMA, "--nope"],
                                  ["compile", MOMA, "-o", "x", "--dialect", "spirv"]])
def test_usage_errors_exit_1(capsys, argv):
    rc, _, err = run(capsys, argv)
    user_error(rc, err)
    assert "usage: moec" in err and err.rstrip().splitlines()[-1].startswith("moec: error: ")


def test_help_and_version_still_exit_0(capsys):
    for argv in (["--help"], ["--version"], ["train", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    capsys.readouterr()


# ---- options that only some targets take ---------------------------------------------------------
@pytest.mark.parametrize(("target", "option", "takers"), [("hls", "--static", "pytorch / mlir"),
                                                          ("triton", "--static", "pytorch / mlir"),
                                                          ("triton", "--plan", "pytorch")])
def test_target_option_messages_list_only_targets_that_take_it(tmp_path, capsys, target, option, takers):
    extra = [option] if option == "--static" else [option, str(tmp_path / "plan.json")]
    rc, _, err = run(capsys, ["compile", MOMA, "--target", target, *extra, "-o", str(tmp_path / "o")])
    user_error(rc, err)
    assert f"{option} does not apply to --target {target} ({option} is for {takers})" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["compile", MIXTRAL, "-t", "hls", "-o", "OUT"], ["csim", MIXTRAL],
                                  ["train", MIXTRAL, "--steps", "1"]])
@pytest.mark.parametrize("seed", ["99999999999999999999999", "-1", "x"])
def test_seed_out_of_range_is_a_usage_error(tmp_path, capsys, argv, seed):
    argv = [str(tmp_path / "o") if a == "OUT" else a for a in argv]
    rc, _, err = run(capsys, [*argv, "--seed", seed])
    user_error(rc, err)
    assert "--seed" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: 1 TB")])
def test_running_out_of_memory_says_so(tmp_path, capsys, monkeypatch, exc):
    def refuse(*_args, **_kwargs):
        raise exc

    monkeypatch.setattr("moec.driver.compile_model", refuse)
    rc, _, err = run(capsys, ["report", MIXTRAL])
    user_error(rc, err)
    assert "out of memory" in err
