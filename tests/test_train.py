"""`python -m fastattn.train` and `python -m fastattn.generate` on the CPU.

Runs are in-process (train.main) where possible, short and tiny; the command-line and torchrun
checks run real subprocesses. The corpus is the standard library's source (the default), capped.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import backend_params

import fastattn
from fastattn import dispatch, generate, train
from fastattn.models.data import TextData, make_batch, read_corpus

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--quiet", "--max-bytes", "1000000", "--seed", "0"]
pytestmark = pytest.mark.xdist_group("train")  # module-scoped training runs: one worker trains each once


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: torch's thread pool only adds contention on a shared 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_run(out: Path, *args: str) -> list[dict]:
    """Train in-process; return the run's metrics."""
    code = train.main([*COMMON, "--out", str(out), *args])
    assert code == 0, f"fastattn.train exited with {code}"
    return read_metrics(out)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(metrics: list[dict]) -> list[float]:
    return [m["loss"] for m in metrics if "loss" in m]


def cli(module: str, *args: str, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def test_batches_are_a_pure_function_of_seed_and_step():
    data = TextData.from_bytes(read_corpus(None, 200_000), min_len=33)
    for task in ("lm", "mlm", "reverse"):
        a = make_batch(task, data.train, seed=1, step=7, batch_size=4, seq_len=32, split="train")
        b = make_batch(task, data.train, seed=1, step=7, batch_size=4, seq_len=32, split="train")
        c = make_batch(task, data.train, seed=1, step=8, batch_size=4, seq_len=32, split="train")
        assert torch.equal(a.idx, b.idx) and torch.equal(a.targets, b.targets)
        assert not torch.equal(a.idx, c.idx)
    lm = make_batch("lm", data.train, seed=0, step=0, batch_size=4, seq_len=32, split="train")
    assert torch.equal(lm.idx[:, 1:], lm.targets[:, :-1])  # next-byte prediction
    rev = make_batch("reverse", data.train, seed=0, step=0, batch_size=4, seq_len=32, split="train")
    assert torch.equal(rev.source.flip(-1), rev.targets) and torch.equal(rev.idx[:, 1:], rev.targets[:, :-1])
    mlm = make_batch("mlm", data.train, seed=0, step=0, batch_size=64, seq_len=32, split="train")
    chosen = mlm.targets != -100
    assert 0.1 < chosen.float().mean() < 0.2 and chosen.any(dim=1).all()
    assert (mlm.idx[~chosen] < 256).all()  # unchosen positions keep their byte


# --------------------------------------------------------------------------------------------
# convergence
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder_runs(tmp_path_factory):
    """The tiny decoder, 60 steps from one seed, on fastattn (automatic backend) and on naive ops."""
    root = tmp_path_factory.mktemp("decoder")
    args = ("--steps", "60", "--batch-size", "8", "--log-interval", "1", "--eval-interval", "30", "--eval-iters", "2")
    fast = train_run(root / "fastattn", *args)
    naive = train_run(root / "naive", *args, "--attn", "naive", "--ffn", "naive")
    return root, fast, naive


def test_decoder_loss_falls_and_fastattn_matches_naive_per_step(decoder_runs):
    _, fast, naive = decoder_runs
    fast_losses, naive_losses = losses(fast), losses(naive)
    assert len(fast_losses) == 60
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(naive_losses), rtol=1e-3, atol=0)
    assert fast_losses[0] > 5.0  # ~ln(320) at the start
    assert sum(fast_losses[-5:]) / 5 < fast_losses[0] - 2.0  # measured: 5.63 -> 3.14


@pytest.mark.parametrize("backend", backend_params("triton", "cpu", "cuda", "reference"))
def test_each_backend_trains_like_naive(tmp_path, backend):
    """A few steps with every op forced onto one backend follow the naive run step by step."""
    args = ("--steps", "3", "--batch-size", "2", "--seq-len", "16", "--log-interval", "1", "--eval-interval", "100",
            "--eval-iters", "1")
    naive = losses(train_run(tmp_path / "naive", *args, "--attn", "naive", "--ffn", "naive"))
    missing = [op for op in ("attention", "feed_forward", "layer_norm") if not dispatch.has_kernels(backend, op)]
    if missing:
        pytest.skip(f"{backend} has no {', '.join(missing)} kernel here yet")
    with fastattn.use_backend(backend):
        fast = losses(train_run(tmp_path / "fast", *args))
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(naive), rtol=1e-4, atol=0)


@pytest.fixture(scope="module")
def encdec_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("encdec")
    metrics = train_run(out, "--arch", "encoder-decoder", "--seq-len", "16", "--batch-size", "32", "--steps", "150",
                        "--eval-interval", "75", "--eval-iters", "4")
    return out, metrics


def test_encoder_decoder_learns_to_restore_reversed_text(encdec_run):
    _, metrics = encdec_run
    val = [m for m in metrics if "val_accuracy" in m]
    # A byte-level LM of this size guesses ~35% of the next bytes; restoring the reversed source
    # through cross-attention gets nearly all.
    assert val[-1]["val_accuracy"] > 0.9, val


def test_generate_restores_a_reversed_prompt(encdec_run, capsys):
    out, _ = encdec_run
    prompt = "return self.x"
    code = generate.main(["--checkpoint", str(out / "checkpoint.pt"), "--prompt", prompt, "--temperature", "0",
                          "--device", "cpu"])
    assert code == 0
    restored = capsys.readouterr().out.rstrip("\n")
    assert len(restored) == len(prompt)
    assert sum(a == b for a, b in zip(restored, prompt)) >= 0.8 * len(prompt), restored


def test_encoder_mlm_loss_falls(tmp_path):
    metrics = train_run(tmp_path, "--arch", "encoder", "--steps", "40", "--batch-size", "8", "--log-interval", "1",
                        "--eval-interval", "40", "--eval-iters", "2")
    mlm = losses(metrics)
    assert sum(mlm[-5:]) / 5 < mlm[0] - 1.5, mlm


# --------------------------------------------------------------------------------------------
# outputs, resume, interruption
# --------------------------------------------------------------------------------------------


def test_metrics_checkpoint_and_plot(decoder_runs):
    root, fast, _ = decoder_runs
    out = root / "fastattn"
    for entry in (m for m in fast if "loss" in m):
        assert {"step", "loss", "lr", "tokens_per_s", "mem_gb"} <= entry.keys()
        assert entry["tokens_per_s"] > 0 and entry["lr"] > 0
    val = [m for m in fast if "val_loss" in m]
    assert [m["step"] for m in val] == [30, 60] and all(0 < m["val_loss"] < 10 for m in val)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 60 and ckpt["config"]["arch"] == "decoder"
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "train"} <= ckpt.keys()
    assert not list(out.glob("*.tmp*"))


def test_generate_cli_continues_the_prompt(decoder_runs, capsys):
    root, _, _ = decoder_runs
    ckpt = str(root / "fastattn" / "checkpoint.pt")
    args = ["--checkpoint", ckpt, "--prompt", "def ", "--max-new-tokens", "40", "--device", "cpu"]
    assert generate.main([*args, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("def ") and len(greedy) > 20
    assert generate.main([*args, "--top-k", "10", "--top-p", "0.9", "--num-samples", "2", "--seed", "1"]) == 0
    assert capsys.readouterr().out.count("--- sample") == 2


def test_stop_and_resume_reproduce_the_uninterrupted_run(tmp_path):
    """Dropout on and two accumulation micro-steps: the resumed run still matches bit for bit."""
    args = ("--steps", "12", "--batch-size", "8", "--grad-accum", "2", "--dropout", "0.1", "--log-interval", "1",
            "--eval-interval", "6", "--eval-iters", "1")
    whole = train_run(tmp_path / "whole", *args)
    first = train_run(tmp_path / "split", *args, "--stop-at", "5")
    assert [m["step"] for m in first if "loss" in m] == [1, 2, 3, 4, 5]
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["step"] == 5
    resumed = train_run(tmp_path / "split", *args, "--resume")
    assert [m["step"] for m in resumed if "loss" in m] == list(range(1, 13))  # each step once
    assert losses(resumed) == losses(whole)
    assert [m["val_loss"] for m in resumed if "val_loss" in m] == [m["val_loss"] for m in whole if "val_loss" in m]


def test_interrupted_run_keeps_its_last_step(tmp_path, monkeypatch):
    real_step = train.Trainer.train_step

    def step_then_interrupt(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(train.Trainer, "train_step", step_then_interrupt)
    code = train.main([*COMMON, "--out", str(tmp_path), "--steps", "10", "--batch-size", "4"])
    assert code == 130
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3


# --------------------------------------------------------------------------------------------
# multi-process
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, mode):
    args = ["--steps", "4", "--batch-size", "8", "--seq-len", "32", "--log-interval", "1", "--eval-interval", "4",
            "--eval-iters", "1", "--device", "cpu"]
    single = train_run(tmp_path / "single", *args)
    extra = ["--fsdp"] if mode == "fsdp" else []
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastattn.train",
         *COMMON, *args, *extra, "--out", str(tmp_path / mode)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = read_metrics(tmp_path / mode)
    torch.testing.assert_close(torch.tensor(losses(multi)), torch.tensor(losses(single)), rtol=1e-5, atol=0)
    val = [m["val_loss"] for m in multi if "val_loss" in m]
    assert val == pytest.approx([m["val_loss"] for m in single if "val_loss" in m], rel=1e-5)
    # The checkpoint holds full tensors, loadable without any process group.
    assert generate.load_model(str(tmp_path / mode / "checkpoint.pt")).num_params() > 0


# --------------------------------------------------------------------------------------------
# bad input: a clear message, a non-zero exit, no traceback, no broken checkpoint
# --------------------------------------------------------------------------------------------


def test_cli_missing_data_path_exits_cleanly(tmp_path):
    proc = cli("fastattn.train", "--data", str(tmp_path / "nowhere.txt"), "--out", str(tmp_path / "out"), "--quiet")
    assert proc.returncode == 2
    assert "no such file or folder" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_cli_unknown_preset_exits_cleanly():
    proc = cli("fastattn.train", "--preset", "huge")
    assert proc.returncode == 2
    assert "invalid choice: 'huge'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stop-at", "50", "--steps", "10"], "--stop-at must be in"),
        (["--batch-size", "6", "--grad-accum", "4"], "multiple of processes"),
        (["--set", "n_layers=3"], "--set expects FIELD=VALUE"),
        (["--set", "n_head=3"], "multiple of n_head"),
        (["--set", "pre_norm=maybe"], "expected true or false"),
        (["--seq-len", "0"], "--seq-len must be > 0"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--data", "."], None),  # a folder works; stops below at the tiny corpus check instead
        (["--resume"], "no checkpoint at"),
    ],
)
def test_bad_arguments_give_a_clear_error(tmp_path, capsys, args, message):
    if args == ["--data", "."]:
        (tmp_path / "corpus").mkdir()
        (tmp_path / "corpus" / "a.txt").write_text("x" * 50)
        args, message = ["--data", str(tmp_path / "corpus")], "too small"
    code = train.main([*COMMON, "--out", str(tmp_path / "out"), "--steps", "10", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    train_run(out, "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-iters", "1")
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resume", "--set", "n_layer=3"], "n_layer=2 in the checkpoint, 3 now"),
        (["--resume", "--seq-len", "32"], "max_seq_len=16 in the checkpoint, 32 now"),
        (["--resume", "--arch", "encoder"], "arch='decoder' in the checkpoint, 'encoder' now"),
        (["--resume", "--seed", "5", "--seq-len", "16"], "seed=0 in the checkpoint, 5 now"),
        (["--seq-len", "16"], "exists: pass --resume"),
    ],
)
def test_checkpoint_of_another_config_is_refused_and_kept(small_checkpoint, capsys, args, message):
    ckpt = small_checkpoint / "checkpoint.pt"
    before = digest(ckpt)
    code = train.main([*COMMON, "--out", str(small_checkpoint), "--steps", "4", "--batch-size", "2", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert digest(ckpt) == before


def test_resume_with_another_implementation_is_allowed(small_checkpoint, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(small_checkpoint, out)
    metrics = train_run(out, "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--eval-iters", "1",
                        "--attn", "sdpa", "--ffn", "naive", "--resume")
    assert [m["step"] for m in metrics if "loss" in m][-1] == 3


def test_corrupt_checkpoint_is_reported(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code = train.main([*COMMON, "--out", str(tmp_path), "--resume"])
    assert code == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    code = generate.main(["--checkpoint", str(tmp_path / "checkpoint.pt")])
    assert code == 2 and "cannot read checkpoint" in capsys.readouterr().err


def test_failed_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    train.save_checkpoint(path, {"step": 1, "model": {}, "config": {}})
    before = digest(path)
    with pytest.raises(Exception):  # noqa: B017  (pickling a lambda fails mid-write)
        train.save_checkpoint(path, {"step": 2, "broken": lambda: None})
    assert digest(path) == before and not list(tmp_path.glob("*.tmp"))


def test_generate_refuses_an_encoder_checkpoint(tmp_path, capsys):
    train_run(tmp_path, "--arch", "encoder", "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-iters", "1")
    code = generate.main(["--checkpoint", str(tmp_path / "checkpoint.pt")])
    assert code == 2 and "does not generate" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_bf16_training_with_compile(tmp_path):
    metrics = train_run(tmp_path, "--device", "cuda", "--dtype", "bf16", "--compile", "--steps", "30",
                        "--batch-size", "16", "--log-interval", "5", "--eval-interval", "30")
    assert losses(metrics)[-1] < 0.7 * losses(metrics)[0]
    assert all("mfu" in m for m in metrics if "loss" in m) or torch.cuda.get_device_name() not in train.PEAK_TFLOPS


@pytest.mark.gpu
def test_gpu_fp16_with_grad_scaler(tmp_path):
    metrics = train_run(tmp_path, "--device", "cuda", "--dtype", "fp16", "--steps", "20", "--batch-size", "16",
                        "--log-interval", "5", "--eval-interval", "20")
    assert all(m["loss"] == m["loss"] for m in metrics if "loss" in m)  # no NaN
    assert losses(metrics)[-1] < losses(metrics)[0]


# --------------------------------------------------------------------------------------------
# found by fuzzing: each a one-line error and a non-zero exit, never a traceback
# --------------------------------------------------------------------------------------------


def test_empty_checkpoint_is_reported(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    code = train.main([*COMMON, "--out", str(tmp_path), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot read checkpoint" in err and "Traceback" not in err
    code = generate.main(["--checkpoint", str(tmp_path / "checkpoint.pt")])
    assert code == 2 and "cannot read checkpoint" in capsys.readouterr().err


def test_truncated_metrics_line_does_not_block_resume(small_checkpoint, tmp_path, capsys):
    """A run killed mid-write leaves half a line; a resume drops it (and any garbage) and goes on."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(small_checkpoint, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('not json at all\n[1, 2]\n{"step": 3, "lo')
    metrics = train_run(out, "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--eval-iters", "1", "--resume")
    assert [m["step"] for m in metrics if "loss" in m][-1] == 3
    assert "dropped 3 unreadable line(s)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--weight-decay", "inf"], "--weight-decay must be >= 0 and finite, got inf"),
        (["--lr", "nan"], "--lr must be > 0 and finite, got nan"),
        (["--grad-clip", "nan"], "--grad-clip must be >= 0 and finite, got nan"),
        (["--min-lr-ratio", "-2"], "--min-lr-ratio must be in [0, 1], got -2.0"),
        (["--min-lr-ratio", "nan"], "--min-lr-ratio must be in [0, 1], got nan"),
    ],
)
def test_non_finite_or_out_of_range_hyperparameters_are_refused(tmp_path, capsys, args, message):
    code = train.main([*COMMON, "--out", str(tmp_path / "out"), "--steps", "2", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_non_finite_loss_stops_training_with_its_step(tmp_path, capsys, monkeypatch):
    original = train.Trainer.train_step

    def train_step(self):
        loss = original(self)
        return torch.full_like(loss, float("nan")) if self.step == 2 else loss

    monkeypatch.setattr(train.Trainer, "train_step", train_step)
    out = tmp_path / "out"
    code = train.main([*COMMON, "--out", str(out), "--steps", "4", "--batch-size", "2", "--seq-len", "16",
                       "--eval-iters", "1", "--log-interval", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "the loss is not finite at step 2" in err and "Traceback" not in err
    assert not (out / "checkpoint.pt").exists()  # no checkpoint of ruined weights
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))


def test_out_an_existing_file_is_refused(tmp_path, capsys):
    path = tmp_path / "a-file"
    path.write_text("keep me")
    code = train.main([*COMMON, "--out", str(path), "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "is not a folder" in err and "Traceback" not in err
    assert path.read_text() == "keep me"


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_generate_refuses_a_non_finite_temperature(small_checkpoint, capsys, value):
    code = generate.main(["--checkpoint", str(small_checkpoint / "checkpoint.pt"), "--temperature", value])
    err = capsys.readouterr().err
    assert code == 2 and "--temperature must be a finite number" in err


def test_binary_data_file_is_named_as_binary(tmp_path, capsys):
    data = tmp_path / "weights.bin"
    data.write_bytes(bytes(range(256)) * 64)
    code = train.main([*COMMON, "--out", str(tmp_path / "out"), "--data", str(data), "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "is a binary file" in err and "0 bytes" not in err
    folder = tmp_path / "binaries"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"\0" * 100)
    code = train.main([*COMMON, "--out", str(tmp_path / "out"), "--data", str(folder), "--steps", "2"])
    assert code == 2 and "only binary files" in capsys.readouterr().err
