"""`mergeflow merge` end to end, as users and outside checks call it."""

import os
import re
import subprocess
import sys

import pytest
import torch
from test_cart import reference_cart

from mergeflow.checkpoints import load_state_dict, save_state_dict
from mergeflow.cli import main
from mergeflow.statedict import mean


@pytest.fixture
def checkpoints(family, tmp_path):
    base, tuned = family
    base_path = tmp_path / "base.safetensors"
    save_state_dict(base, base_path)
    paths = []
    for i, state in enumerate(tuned[:3]):
        paths.append(tmp_path / f"task{i}.safetensors")
        save_state_dict(state, paths[-1])
    return base, tuned[:3], str(base_path), [str(p) for p in paths]


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mergeflow", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_cart_merge_end_to_end(checkpoints, tmp_path):
    base, tuned, base_path, paths = checkpoints
    out = tmp_path / "merged" / "cart.safetensors"
    result = run_cli(
        "merge",
        "--method",
        "cart",
        "--base",
        base_path,
        "--finetuned",
        *paths,
        "--param",
        "rank_ratio=0.25",
        "--param",
        "scale=0.8",
        "--out",
        str(out),
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert "cart rank_ratio=0.25 scale=0.8" in result.stdout
    merged = load_state_dict(out)
    selected = {k for k in merged if "attn" in k or "mlp" in k}
    selected = {k for k in selected if "bias" not in k and "ln" not in k and merged[k].ndim == 2}
    expected = reference_cart(tuned, 0.25, 0.8, selected)
    for key in merged:
        torch.testing.assert_close(merged[key].double(), expected[key], rtol=1e-4, atol=1e-5)


def test_average_and_task_arithmetic_end_to_end(checkpoints, tmp_path):
    base, tuned, base_path, paths = checkpoints
    out_avg, out_ta = tmp_path / "avg.safetensors", tmp_path / "ta.safetensors"
    r1 = run_cli(
        "merge",
        "--method",
        "average",
        "--base",
        base_path,
        "--finetuned",
        *paths,
        "--out",
        str(out_avg),
        "-q",
    )
    r2 = run_cli(
        "merge",
        "--method",
        "task_arithmetic",
        "--base",
        base_path,
        "--finetuned",
        *paths,
        "--param",
        "scale=0.5",
        "--out",
        str(out_ta),
        "-q",
    )
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    averaged = load_state_dict(out_avg)
    for key, value in mean(tuned).items():
        torch.testing.assert_close(averaged[key], value)
    arithmetic = load_state_dict(out_ta)
    for key in base:
        expected = base[key] + 0.5 * sum(t[key] - base[key] for t in tuned)
        torch.testing.assert_close(arithmetic[key], expected, rtol=1e-5, atol=1e-6)


def test_merge_over_s3(checkpoints, bucket, tmp_path):
    base, tuned, base_path, paths = checkpoints
    uris = []
    for path in [base_path, *paths]:
        uri = f"s3://{bucket}/zoo/{os.path.basename(path)}"
        save_state_dict(load_state_dict(path), uri)
        uris.append(uri)
    out = f"s3://{bucket}/merged/cart.safetensors"
    env = {"MERGEFLOW_CACHE_DIR": str(tmp_path / "cache")}
    result = run_cli(
        "merge",
        "--method",
        "cart",
        "--base",
        uris[0],
        "--finetuned",
        *uris[1:],
        "--param",
        "rank_ratio=1.0",
        "--out",
        out,
        "-q",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    merged = load_state_dict(out)
    for key, value in mean(tuned).items():  # full-rank CART is weight averaging
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)


def run_main(argv):
    """``main``'s exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize(
    "extra,reason",
    [
        (
            ["--method", "slerp"],
            r"unknown merge method 'slerp' \(known: adamerging, average, .*, twin_merging\)",
        ),
        (["--method", "cart", "--param", "rank=0.1"], r"method 'cart' has no parameter 'rank'"),
        (["--method", "cart", "--param", "rank_ratio=1.5"], r"parameter 'rank_ratio'.*1\.5"),
        (["--method", "cart", "--param", "rank_ratio=abc"], r"parameter 'rank_ratio'.*abc"),
        (["--method", "task_arithmetic", "--param", "scale"], r"expected key=value"),
        (["--method", "cart", "--param", "scale=1", "--param", "scale=2"], r"'scale' given twice"),
    ],
)
def test_bad_parameters_exit_with_one_line(checkpoints, tmp_path, capsys, extra, reason):
    _, _, base_path, paths = checkpoints
    out = tmp_path / "never.safetensors"
    code = run_main(
        ["merge", "--base", base_path, "--finetuned", *paths, "--out", str(out), *extra]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(reason, err), err
    assert not out.exists()


def test_mismatched_checkpoint_names_file_and_key(checkpoints, tmp_path):
    base, tuned, base_path, paths = checkpoints
    bad = dict(tuned[0])
    bad["visual.proj"] = torch.zeros(16, 32)
    bad_path = tmp_path / "wrong_shape.safetensors"
    save_state_dict(bad, bad_path)
    out = tmp_path / "never.safetensors"
    result = run_cli(
        "merge",
        "--method",
        "average",
        "--base",
        base_path,
        "--finetuned",
        paths[0],
        str(bad_path),
        "--out",
        str(out),
    )
    assert result.returncode == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "wrong_shape.safetensors" in line and "'visual.proj'" in line
    assert not out.exists()


def test_missing_checkpoint_is_named(checkpoints, tmp_path, capsys):
    _, _, base_path, paths = checkpoints
    code = run_main(
        [
            "merge",
            "--method",
            "average",
            "--base",
            base_path,
            "--finetuned",
            paths[0],
            str(tmp_path / "absent.safetensors"),
            "--out",
            str(tmp_path / "o.safetensors"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "absent.safetensors: no such file" in err


def test_methods_lists_every_registered_method(capsys):
    from mergeflow.continual import CONTINUAL
    from mergeflow.methods import METHODS, all_methods
    from mergeflow.twin import ROUTED

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    one_shot, continual = out.split("\ncontinual methods (an arrivals spec's method")

    def names(text):
        return {line.split()[0] for line in text.splitlines() if line and not line[0].isspace()}

    assert names(one_shot) == set(all_methods())
    assert "twin_merging" in ROUTED and "concrete" in all_methods()
    continual, elsewhere = continual.split("\n\n", 1)
    assert names(continual.split("\n", 1)[1]) == set(CONTINUAL)
    assert names(elsewhere.split("\n", 1)[1]) == {"align", "mc_smoe"}
    for name, method in all_methods().items():
        needs = "[needs samples: pipeline only]"
        line = next(line for line in one_shot.splitlines() if line.startswith(f"{name} "))
        assert (needs in line) == (name not in METHODS), name
        assert method.reference in one_shot, name
        assert method.describe_params() in one_shot, name
    for name, method in CONTINUAL.items():
        assert method.describe_params() in continual, name


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", {"density": "0.3", "scale": "0.9", "aggregate": "sum"}),
        ("ties", {"center": "average", "density": "0.5"}),
        ("dare", {"p": "0.4", "seed": "3", "combine": "ties", "density": "0.5"}),
        ("tsv_m", {"scale": "1.2"}),
        ("iso_c", {"scale": "1.3", "include": "mlp"}),
        ("iso_cts", {"common_fraction": "0.5"}),
        ("consensus", {"k": "2", "mask_lambda": "0.4"}),
        ("tall_masks", {"task": "1"}),
        ("pcb", {"ratio": "0.2"}),
        ("cart", {"energy": "0.8"}),
        ("cart_indexed", {"task": "2", "rank_ratio": "0.25"}),
    ],
)
def test_every_method_runs_from_the_command_line(checkpoints, tmp_path, capsys, method, params):
    from mergeflow.checkpoints import StateDictReader
    from mergeflow.merge import merge_readers

    base, tuned, base_path, paths = checkpoints
    out = tmp_path / f"{method}.safetensors"
    uses_base = params.get("center") != "average" and method not in ("cart", "cart_indexed")
    args = ["merge", "--method", method, "--finetuned", *paths, "--out", str(out), "-q"]
    args += ["--base", base_path] if uses_base else []
    for key, value in params.items():
        args += ["--param", f"{key}={value}"]
    assert main(args) == 0, capsys.readouterr().err
    assert method in capsys.readouterr().out
    expected = merge_readers(
        method,
        [StateDictReader(t) for t in tuned],
        StateDictReader(base) if uses_base else None,
        params=params,
        device="cpu",
    )
    merged = load_state_dict(out)
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key])


def test_compress_and_rebuild(checkpoints, tmp_path, capsys):
    from mergeflow.checkpoints import StateDictReader
    from mergeflow.merge import merge_readers

    _, tuned, _, paths = checkpoints
    index = tmp_path / "index.safetensors"
    args = ["compress", "--finetuned", *paths, "--tasks", "a", "b", "c", "--out", str(index)]
    assert main([*args, "--param", "rank_ratio=0.25", "-q"]) == 0
    assert re.search(r"3 tasks in [\d.]+ MiB, 0\.\d+ of the", capsys.readouterr().out)
    out = tmp_path / "b.safetensors"
    assert main(["rebuild", str(index), "--task", "b", "--out", str(out)]) == 0
    expected = merge_readers(
        "cart_indexed",
        [StateDictReader(t) for t in tuned],
        params={"task": 1, "rank_ratio": 0.25},
        device="cpu",
    )
    rebuilt = load_state_dict(out)
    for key in expected:
        torch.testing.assert_close(rebuilt[key], expected[key])
    assert main(["rebuild", str(index), "--task", "z", "--out", str(out)]) == 2
    assert "unknown task 'z' (this index holds: a, b, c)" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_refused_by_file_and_key(checkpoints, tmp_path, capsys, bad):
    base, tuned, base_path, paths = checkpoints
    poisoned = dict(tuned[1])
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    poisoned[key] = poisoned[key].clone()
    poisoned[key][0, 0] = bad
    save_state_dict(poisoned, paths[1])
    out = tmp_path / "never.safetensors"
    for method in ("cart", "ties"):
        args = ["merge", "--method", method, "--base", base_path, "--finetuned", *paths]
        assert main([*args, "--out", str(out), "-q"]) == 2
        err = capsys.readouterr().err
        assert f"{paths[1]}: key '{key}' holds 1 NaN or Inf value(s)" in err
        assert not out.exists()


def test_doctor_checks_each_store_by_writing_to_it(s3_endpoint, bucket, tmp_path):
    """Against real stores: a local cache, the result store on (moto's) S3, MLflow on
    SQLite. All answer: exit 0, one line each; a missing bucket and an unwritable cache
    are each named, and the exit status says so."""
    env = {
        "MERGEFLOW_CACHE_DIR": str(tmp_path / "cache"),
        "MERGEFLOW_RESULT_STORE": f"s3://{bucket}/results",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MERGEFLOW_ARTIFACT_ROOT": f"s3://{bucket}/artifacts",
    }
    healthy = run_cli("doctor", env=env)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    lines = healthy.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "ok    cache",
        "ok    result store",
        "ok    tracking",
        "ok    artifacts",
        "ok    versions",
    ]
    assert f"s3://{bucket}/results (writable)" in lines[1]
    assert healthy.stderr == ""
    import boto3

    left = boto3.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount", 0)
    assert left == 0  # the probes are removed
    (tmp_path / "not-a-folder").write_text("")
    broken = {
        **env,
        "MERGEFLOW_CACHE_DIR": str(tmp_path / "not-a-folder"),
        "MERGEFLOW_RESULT_STORE": "s3://no-such-bucket-here/results",
    }
    sick = run_cli("doctor", env=broken)
    assert sick.returncode == 1
    failed = [line for line in sick.stdout.splitlines() if line.startswith("FAIL")]
    assert any(f"cache: {tmp_path / 'not-a-folder'}: cannot write there" in f for f in failed)
    assert any("result store: s3://no-such-bucket-here/results: cannot write" in f for f in failed)
