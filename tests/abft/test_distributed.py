"""Two CPU processes (torchrun, gloo) train like one process on the same global batch: the same
q/k weights to float32 rounding, the same PID trajectory and passing-head counts, one report and
one weights file written by the main process only."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tokenizers_offline import save_tiny_llama

from abft_fast.abft import cli, data

ARGS = ["train", "--dataset", "sst2", "--k", "4", "--train-prompts", "8", "--steps", "3",
        "--batch", "4", "--micro-batch", "1", "--lr", "1e-3", "--eval-queries", "4",
        "--eval-batch", "4", "--seed", "1", "--backend", "torch", "--no-plots", "--no-progress",
        "--no-filter"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    task = data.load_task("sst2")
    save_tiny_llama(d, [" ".join(e.inputs) for e in task.pool])
    return str(d)


def launch(launcher, args, cwd, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    env.pop("TRITON_INTERPRET", None)  # the torch backend: no Triton in these runs
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "abft_fast.abft.cli", *args]
    else:
        # without a GPU, --multi_gpu launches through torchrun and the processes join one gloo
        # group (make_accelerator); `--cpu` would launch ONE process
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "abft_fast.abft.cli", *args]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def strip(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.fixture(scope="module")
def one(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    cli.main([*ARGS, "--model", model_dir, "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def two(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    printed = launch("torchrun", [*ARGS, "--model", model_dir, "--out", str(out),
                                  "--save-every", "2"], out)
    return out, printed


def same_weights(d1, d2):
    w1, w2 = load_file(str(d1 / "qk.safetensors")), load_file(str(d2 / "qk.safetensors"))
    assert set(w1) == set(w2) and len(w1) == 4
    return w1, w2


def test_two_processes_equal_one(model_dir, one, two):
    two, printed = two
    # the main process alone prints, evaluates and writes
    assert "2 processes" in printed
    assert printed.count("accuracy before:") == 1 and printed.count("report in") == 1
    assert sorted(os.listdir(two)) == ["checkpoints", "qk.safetensors", "report.json"]
    assert sorted(os.listdir(two / "checkpoints")) == ["step-000003"]  # the newest kept
    r1 = json.loads((one / "report.json").read_text())
    r2 = json.loads((two / "report.json").read_text())
    assert r2["processes"] == 2 and r1["processes"] == 1
    h1, h2 = strip(r1["history"]), strip(r2["history"])
    assert [h["step"] for h in h2] == [1, 2, 3]
    # PID trajectory and head counts identical; step 1 (same weights) identical in every field
    assert [h["A"] for h in h2] == [h["A"] for h in h1]
    assert [h["passing_heads"] for h in h2] == [h["passing_heads"] for h in h1]
    assert h2[0] == h1[0]
    for a, b in zip(h1[1:], h2[1:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert r2["accuracy_before"] == r1["accuracy_before"]
    assert r2["accuracy_after"] == r1["accuracy_after"]
    w1, w2 = same_weights(one, two)
    init = load_file(os.path.join(model_dir, "model.safetensors"))
    for n in w1:
        assert not torch.equal(w1[n], init[n])  # trained
        # equal to float32 rounding (DDP averages the two processes' gradient sums)
        torch.testing.assert_close(w2[n], w1[n], rtol=1e-5, atol=1e-7)


def test_accelerate_launch_resumes_a_two_process_checkpoint(model_dir, one, two, tmp_path):
    two, _ = two
    out = tmp_path / "resumed"
    printed = launch("accelerate", [*ARGS, "--model", model_dir, "--out", str(out), "--resume",
                                    str(two / "checkpoints")], tmp_path)
    assert "2 processes" in printed
    r1 = json.loads((one / "report.json").read_text())
    r3 = json.loads((out / "report.json").read_text())
    # the checkpoint of the finished run: no step trains again, the history comes back whole
    assert [h["A"] for h in r3["history"]] == [h["A"] for h in r1["history"]]
    assert strip(r3["history"]) == strip(json.loads((two / "report.json").read_text())["history"])
    w1, w3 = same_weights(one, out)
    w2 = load_file(str(two / "qk.safetensors"))
    for n in w1:
        assert torch.equal(w3[n], w2[n])


@pytest.fixture(scope="module")
def fsdp(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    printed = launch("torchrun", [*ARGS, "--model", model_dir, "--out", str(out), "--fsdp"], out)
    return out, printed


def test_fsdp_two_processes_equal_one(one, fsdp):
    # --fsdp: the trainer applies FSDP2 itself (every decoder layer and the model), gloo on CPU
    out, printed = fsdp
    assert printed.count("accuracy before:") == 1 and printed.count("report in") == 1
    assert sorted(os.listdir(out)) == ["qk.safetensors", "report.json"]
    r1 = json.loads((one / "report.json").read_text())
    r2 = json.loads((out / "report.json").read_text())
    assert r2["processes"] == 2 and r2["settings"]["fsdp"] is True
    h1, h2 = strip(r1["history"]), strip(r2["history"])
    assert [h["A"] for h in h2] == pytest.approx([h["A"] for h in h1], rel=1e-6)
    assert [h["passing_heads"] for h in h2] == [h["passing_heads"] for h in h1]
    assert r2["accuracy_after"] == r1["accuracy_after"]
    w1, w2 = same_weights(one, out)  # gathered from the shards by the main process
    for n in w1:
        torch.testing.assert_close(w2[n], w1[n], rtol=1e-5, atol=1e-7)


def test_fsdp_refuses_checkpoints(model_dir, tmp_path):
    with pytest.raises(NotImplementedError, match="--fsdp"):
        cli.main([*ARGS, "--model", model_dir, "--out", str(tmp_path), "--fsdp",
                  "--save-every", "1"])


@pytest.mark.parametrize("flag", [["--fsdp-param-dtype", "bfloat16"], ["--fsdp-cpu-offload"]],
                         ids=["mixed-precision", "cpu-offload"])
def test_fsdp_options_need_fsdp_and_say_where_they_run(model_dir, tmp_path, flag):
    with pytest.raises(ValueError, match="need fsdp=True"):
        cli.main([*ARGS, "--model", model_dir, "--out", str(tmp_path), *flag])
    if not torch.cuda.is_available():
        printed = None
        try:
            launch("torchrun", [*ARGS, "--model", model_dir, "--out", str(tmp_path), "--fsdp",
                                *flag], tmp_path)
        except AssertionError as e:
            printed = str(e)
        assert printed is not None and "need GPUs" in printed
