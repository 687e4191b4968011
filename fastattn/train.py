"""Train the reference Transformer on byte-level text: ``python -m fastattn.train``.

    python -m fastattn.train --preset tiny --steps 200                  # GPT on the stdlib's source, CPU
    python -m fastattn.train --arch encoder-decoder --attn naive        # seq2seq with cross-attention
    python -m fastattn.train --preset 124m --device cuda --dtype bf16 --compile
    torchrun --nproc_per_node=2 -m fastattn.train ...                   # DDP (NCCL on GPUs, gloo on CPUs)
    python -m fastattn.train --out DIR --resume                         # continue DIR/checkpoint.pt

A run writes DIR/metrics.jsonl (one JSON object per logged step: step, loss, lr, tokens_per_s, ...;
validation entries carry val_loss), DIR/checkpoint.pt and DIR/loss.png. Batches are a pure
function of (seed, step), and dropout masks of (seed, step, rank, micro-step), so a resumed run, or
one split over N processes, trains on exactly what an uninterrupted single-process run does.
``--batch-size`` is the global batch of one optimizer step, whatever the number of processes and
of accumulation micro-steps.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fastattn.models import PRESETS, ModelConfig, Transformer
from fastattn.models.data import MODEL_VOCAB_SIZE, TASKS, DataError, TextData, make_batch, read_corpus
from fastattn.models.transformer import ARCHS, ATTN_IMPLS, FFN_IMPLS

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
# Fields that may differ between a checkpoint and the run resuming it: the same weights run on any
# implementation of the ops.
IMPL_FIELDS = ("attn_impl", "ffn_impl", "norm_impl")
# Training settings that fix the data order: a resumed run must keep them.
DATA_FIELDS = ("seed", "batch_size", "seq_len", "data", "max_bytes")
# Peak learning rates per preset. tiny and small use the width-aware init (N(0, 1) embeddings), whose
# embeddings need a larger Adam step than GPT-2's 0.02 init (124m) to move at the same relative speed.
DEFAULT_LR = {"tiny": 5e-3, "small": 2e-3, "124m": 6e-4}
# Dense peak TFLOP/s of 16-bit tensor-core math, for MFU (TF32 is half of it).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "V100": 125.0}


class TrainError(Exception):
    """A problem with the command line, the data or a checkpoint: reported without a traceback."""


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastattn.train", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--arch", choices=ARCHS, default="decoder", help="decoder (GPT), encoder (BERT MLM), encoder-decoder (seq2seq)")
    a("--preset", choices=list(PRESETS), default="tiny", help="model size")
    a("--attn", choices=ATTN_IMPLS, default="fastattn", help="attention implementation")
    a("--ffn", choices=FFN_IMPLS, default="fastattn", help="feed-forward (and norm) implementation")
    a("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
      help="override a ModelConfig field, e.g. --set pos_encoding=rotary --set pre_norm=false")
    a("--steps", type=int, default=500, help="optimizer steps of the whole run (the LR schedule follows it)")
    a("--stop-at", type=int, default=None, metavar="STEP", help="end after STEP steps with a checkpoint")
    a("--batch-size", type=int, default=32, help="sequences per optimizer step, over all processes")
    a("--grad-accum", type=int, default=1, help="micro-steps per process per optimizer step")
    a("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's max_seq_len)")
    a("--lr", type=float, default=None, help="peak learning rate (default: per preset, " +
      ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    a("--min-lr-ratio", type=float, default=0.1, help="final LR of the cosine, as a fraction of --lr")
    a("--warmup", type=int, default=None, help="linear warmup steps (default: 5%% of --steps, at most 200)")
    a("--weight-decay", type=float, default=0.1)
    a("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    a("--dropout", type=float, default=0.0, help="dropout (the presets train with 0)")
    a("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    a("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
      help="autocast dtype (default: bf16 on cuda, fp32 on cpu); fp16 uses a GradScaler")
    a("--data", default=None, metavar="PATH", help="a text file or folder (default: the stdlib's *.py files)")
    a("--max-bytes", type=int, default=16 << 20, help="corpus size cap")
    a("--out", default=None, metavar="DIR", help="output folder (default: runs/<arch>-<preset>)")
    a("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    a("--overwrite", action="store_true", help="start afresh even if DIR holds a checkpoint")
    a("--seed", type=int, default=1337)
    a("--compile", action="store_true", help="torch.compile the model")
    a("--fsdp", action="store_true", help="shard parameters with FSDP2 (fully_shard) instead of DDP")
    a("--log-interval", type=int, default=10, help="steps between metrics lines")
    a("--eval-interval", type=int, default=100, help="steps between validation losses")
    a("--eval-iters", type=int, default=10, help="validation batches per evaluation")
    a("--ckpt-interval", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    a("--quiet", action="store_true", help="no progress bar")
    return p


def check_args(args) -> None:
    def positive(name, value, allow_zero=False):
        finite = value is None or math.isfinite(value)  # nan and inf pass every comparison below
        if not finite or (value is not None and (value < 0 or (value == 0 and not allow_zero))):
            raise TrainError(f"--{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value}")

    for name in ("steps", "batch_size", "grad_accum", "seq_len", "lr", "log_interval", "eval_interval", "eval_iters"):
        positive(name.replace("_", "-"), getattr(args, name))
    for name in ("warmup", "weight_decay", "grad_clip", "ckpt_interval", "max_bytes"):
        positive(name.replace("_", "-"), getattr(args, name), allow_zero=True)
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        raise TrainError(f"--stop-at must be in [1, --steps={args.steps}], got {args.stop_at}")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        raise TrainError(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if not 0.0 <= args.dropout < 1.0:
        raise TrainError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    if args.resume and args.overwrite:
        raise TrainError("--resume and --overwrite contradict each other")


def _parse_value(field: dataclasses.Field, text: str):
    kind = str(field.type)
    if text.lower() in ("none", "null") and "None" in kind:
        return None
    if kind.startswith("bool"):
        if text.lower() not in ("true", "false", "1", "0"):
            raise TrainError(f"--set {field.name}: expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    for caster, name in ((int, "int"), (float, "float")):
        if kind.startswith(name):
            try:
                return caster(text)
            except ValueError:
                raise TrainError(f"--set {field.name}: expected {name}, got {text!r}") from None
    return text


def model_config(args) -> ModelConfig:
    """The ModelConfig the command line describes."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    overrides = {}
    for item in args.overrides:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise TrainError(f"--set expects FIELD=VALUE with FIELD a ModelConfig field ({', '.join(fields)}), got {item!r}")
        overrides[name] = _parse_value(fields[name], text)
    overrides.setdefault("vocab_size", MODEL_VOCAB_SIZE)  # byte-level data, whatever the preset
    if args.seq_len is not None:
        overrides.setdefault("max_seq_len", args.seq_len)
    try:
        return ModelConfig.preset(
            args.preset, arch=args.arch, attn_impl=args.attn, ffn_impl=args.ffn, dropout=args.dropout, **overrides
        )
    except (ValueError, TypeError) as exc:
        raise TrainError(f"bad model configuration: {exc}") from None


# --------------------------------------------------------------------------------------------
# processes, devices, precision
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(args) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if args.device == "cuda":
        torch.cuda.set_device(d.local_rank)
    dist.init_process_group(backend="nccl" if args.device == "cuda" else "gloo")
    return d


def device_of(args, d: Dist) -> torch.device:
    return torch.device("cuda", d.local_rank) if args.device == "cuda" else torch.device("cpu")


def autocast_dtype(args) -> torch.dtype | None:
    name = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """The device's dense peak FLOP/s for the run's math, when known (for MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12 / (2 if dtype is None else 1)
    return None


def memory_gb(device: torch.device) -> float:
    """Peak memory of the run: allocated on the GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """The dropout RNG seed of one micro-step: resumed and uninterrupted runs draw the same masks."""
    return (seed * 1_000_003 + step * 1_009 + rank * 101 + micro) % 2**63


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (some exceptions, e.g. an empty file's, have none)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def load_checkpoint(path: str | Path) -> dict:
    """A fastattn checkpoint as saved by this script, loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated, empty or foreign file: say so, no traceback
        raise TrainError(f"cannot read checkpoint {path}: {first_line(exc)}") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= set(ckpt):
        raise TrainError(f"{path} is not a fastattn.train checkpoint (no model/config/step entries)")
    return ckpt


def config_from_checkpoint(ckpt: dict, **overrides) -> ModelConfig:
    try:
        return ModelConfig(**{**ckpt["config"], **overrides})
    except (TypeError, ValueError) as exc:
        raise TrainError(f"the checkpoint's model config is not valid here: {exc}") from None


def check_resumable(ckpt: dict, cfg: ModelConfig, train_state: dict, path: Path) -> None:
    """The checkpoint must come from the same model and data order as the command line's."""
    differences = []
    saved_cfg = ckpt["config"]
    for name, value in cfg.to_dict().items():
        if name not in IMPL_FIELDS and saved_cfg.get(name) != value:
            differences.append(f"{name}={saved_cfg.get(name)!r} in the checkpoint, {value!r} now")
    saved_train = ckpt.get("train", {})
    for name in DATA_FIELDS:
        if saved_train.get(name) != train_state[name]:
            differences.append(f"{name}={saved_train.get(name)!r} in the checkpoint, {train_state[name]!r} now")
    if differences:
        raise TrainError(
            f"{path} was written by another configuration; resume it with the same options or use another --out:\n  "
            + "\n  ".join(differences)
        )


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    """The metrics lines that are whole JSON objects with a step; a line cut short by a killed run
    (or any other garbage) is dropped with a warning, since a resume rewrites the file anyway."""
    if not path.exists():
        return []
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            kept.append(entry)
        else:
            dropped += 1
    if dropped:
        print(f"python -m fastattn.train: warning: {path}: dropped {dropped} unreadable line(s)", file=sys.stderr)
    return kept


def plot_losses(metrics: list[dict], path: Path) -> None:
    """loss.png: training loss per logged step and validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def lr_schedule(steps: int, warmup: int, min_ratio: float):
    """LR factor of update ``i``: linear warmup, then a cosine from 1 to min_ratio at ``steps``."""

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / (warmup + 1)
        progress = min(1.0, (i - warmup) / max(1, steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class Trainer:
    def __init__(self, args, cfg: ModelConfig, data: TextData, d: Dist, device: torch.device):
        self.args, self.cfg, self.data, self.d, self.device = args, cfg, data, d, device
        self.task = TASKS[cfg.arch]
        self.seq_len = args.seq_len or cfg.max_seq_len
        self.rank_batch = args.batch_size // d.world
        self.micro_batch = self.rank_batch // args.grad_accum
        self.dtype = autocast_dtype(args)
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        self.model = Transformer(cfg).to(device)
        self.module = self._wrap(self.model)
        self.optimizer = self.model.configure_optimizer(
            args.lr, args.weight_decay, fused=True if device.type == "cuda" and not args.fsdp else None
        )
        warmup = args.warmup if args.warmup is not None else min(200, args.steps // 20)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_schedule(args.steps, warmup, args.min_lr_ratio)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.step = 0
        self.flops_per_token = self.model.flops_per_token(self.seq_len)
        self.peak = peak_flops(device, self.dtype)

    def _wrap(self, model):
        module = model
        if self.args.fsdp:
            from torch.distributed.fsdp import fully_shard

            if self.d.world > 1:
                for block in (*getattr(model, "encoder", []), *getattr(model, "decoder", [])):
                    fully_shard(block)
                fully_shard(model)
        elif self.d.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return torch.compile(module) if self.args.compile else module

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _sync_grads(self, sync: bool):
        """DDP all-reduces gradients on the last micro-step only."""
        ddp = self.module._orig_mod if hasattr(self.module, "_orig_mod") else self.module
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and not sync:
            return ddp.no_sync()
        if self.args.fsdp and self.d.world > 1:
            self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def _all_reduce(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.d.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def train_step(self) -> torch.Tensor:
        """One optimizer step on batch ``self.step``; returns this rank's share of the global mean loss."""
        args, d = self.args, self.d
        batch = make_batch(
            self.task, self.data.train, seed=args.seed, step=self.step, batch_size=args.batch_size,
            seq_len=self.seq_len, split="train",
        )
        n_global = batch.num_targets
        mine = batch[d.rank * self.rank_batch : (d.rank + 1) * self.rank_batch]
        self.module.train()
        loss_share = torch.zeros((), device=self.device)
        for micro in range(args.grad_accum):
            mb = mine[micro * self.micro_batch : (micro + 1) * self.micro_batch]
            # Each micro-batch's mean loss weighted by its share of the global batch's targets: the
            # gradients summed over micro-steps (and averaged by DDP over ranks, hence × world) are
            # those of the global batch's mean loss, even when micro-batches hold unequal counts (MLM).
            weight = mb.num_targets / n_global
            mb = mb.to(self.device, non_blocking=True)
            if self.cfg.dropout > 0:
                torch.manual_seed(step_seed(args.seed, self.step, d.rank, micro))
            with self._sync_grads(micro == args.grad_accum - 1), self.autocast():
                _, loss = self.module(mb.idx, mb.targets, source=mb.source)
            self.scaler.scale(loss * (weight * d.world)).backward()
            loss_share += loss.detach().float() * weight
        if args.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return loss_share

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean validation loss and token accuracy over --eval-iters fixed batches."""
        args, d = self.args, self.d
        self.module.eval()
        loss_sum = correct = count = 0.0
        for i in range(args.eval_iters):
            batch = make_batch(
                self.task, self.data.val, seed=args.seed, step=i, batch_size=args.batch_size,
                seq_len=self.seq_len, split="val",
            )
            mine = batch[d.rank * self.rank_batch : (d.rank + 1) * self.rank_batch]
            for start in range(0, len(mine), self.micro_batch):
                mb = mine[start : start + self.micro_batch].to(self.device)
                with self.autocast():
                    logits, loss = self.module(mb.idx, mb.targets, source=mb.source)
                counted = mb.targets != -100
                n = int(counted.sum())
                loss_sum += loss.float().item() * n
                correct += int(((logits.argmax(-1) == mb.targets) & counted).sum())
                count += n
        loss_sum, correct, count = self._all_reduce(loss_sum, correct, count)
        return {"val_loss": loss_sum / count, "val_accuracy": correct / count}

    # ---- checkpoints ----------------------------------------------------------------------------

    def train_state(self) -> dict:
        a = self.args
        return {
            "seed": a.seed, "batch_size": a.batch_size, "seq_len": self.seq_len, "steps": a.steps,
            "data": None if a.data is None else str(Path(a.data).resolve()), "max_bytes": a.max_bytes,
            "lr": a.lr, "task": self.task,
        }

    def _state_dict_options(self, saving: bool):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # Full (unsharded) tensors keyed by parameter name, whatever the wrapping: a checkpoint of an
        # FSDP run resumes without FSDP and the other way round. FSDP gathers to rank 0's CPU.
        return StateDictOptions(full_state_dict=True, cpu_offload=saving and self.d.world > 1)

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        opts = self._state_dict_options(saving=True)
        return {
            "model": get_model_state_dict(self.model, options=opts),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=opts),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
            "config": self.cfg.to_dict(), "train": self.train_state(), "rng": rng_state(self.device),
        }

    def load_state_dict(self, ckpt: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        opts = self._state_dict_options(saving=False)
        try:
            set_model_state_dict(self.model, ckpt["model"], options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, ckpt["optimizer"], options=opts)
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise TrainError(f"the checkpoint's states do not load into this run: {str(exc).splitlines()[0]}") from None
        self.step = int(ckpt["step"])
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"], self.device)

    def save(self, path: Path) -> None:
        state = self.state_dict()  # every rank takes part (FSDP gathers the full tensors)
        if self.d.main:
            save_checkpoint(path, state)
        if self.d.world > 1:
            dist.barrier()


def prepare(args, d: Dist):
    """Everything that can fail on bad input, checked before anything is written."""
    check_args(args)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.preset]
    cfg = model_config(args)
    seq_len = args.seq_len or cfg.max_seq_len
    if seq_len > cfg.max_seq_len:
        raise TrainError(f"--seq-len {seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    if args.batch_size % (d.world * args.grad_accum):
        raise TrainError(
            f"--batch-size {args.batch_size} must be a multiple of processes × --grad-accum = {d.world * args.grad_accum}"
        )
    if args.fsdp and args.dtype == "fp16":
        raise TrainError("--fsdp trains in fp32 or bf16 (fp16's GradScaler is not sharded here)")
    out = Path(args.out or f"runs/{args.arch}-{args.preset}")
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} exists and is not a folder")
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not (args.resume or args.overwrite):
        raise TrainError(f"{ckpt_path} exists: pass --resume to continue it, --overwrite to start afresh, or another --out")
    ckpt = load_checkpoint(ckpt_path) if args.resume else None
    data = TextData.from_bytes(read_corpus(args.data, args.max_bytes), min_len=seq_len + 1)
    return cfg, data, out, ckpt


def run(args) -> None:
    d = setup_distributed(args)
    try:
        cfg, data, out, ckpt = prepare(args, d)
        device = device_of(args, d)
        trainer = Trainer(args, cfg, data, d, device)
        ckpt_path, metrics_path = out / CHECKPOINT, out / METRICS
        if ckpt is not None:
            check_resumable(ckpt, cfg, trainer.train_state(), ckpt_path)
            trainer.load_state_dict(ckpt)
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
            # A resumed run keeps the metrics up to its checkpoint (later lines were lost with the run).
            kept = [m for m in read_metrics(metrics_path) if m["step"] <= trainer.step] if ckpt else []
            metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        train_loop(trainer, out)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train_loop(trainer: Trainer, out: Path) -> None:
    from tqdm import tqdm

    args, d, device = trainer.args, trainer.d, trainer.device
    end = args.stop_at or args.steps
    if trainer.step >= end:
        if d.main:
            print(f"{out / CHECKPOINT} is at step {trainer.step}: nothing left to train up to step {end}")
        return
    metrics_file = open(out / METRICS, "a") if d.main else None
    tokens_per_step = args.batch_size * trainer.seq_len
    bar = tqdm(total=args.steps, initial=trainer.step, disable=args.quiet or not d.main, dynamic_ncols=True,
               desc=f"{trainer.cfg.arch} {args.preset}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loss_sum, since, t_last = torch.zeros((), device=device), 0, time.perf_counter()
    # The first step whose loss was not finite (0: none), kept on the device: no sync per step.
    bad_step = torch.zeros((), dtype=torch.int64, device=device)
    try:
        while trainer.step < end:
            lr = trainer.optimizer.param_groups[0]["lr"]
            loss = trainer.train_step()
            loss_sum += loss
            since += 1
            step = trainer.step
            bad_step = torch.where((bad_step == 0) & ~torch.isfinite(loss), step, bad_step)
            bar.update(1)
            logging = step % args.log_interval == 0 or step == end
            saving = args.ckpt_interval and step % args.ckpt_interval == 0 and step != end
            evaluating = step % args.eval_interval == 0 or step == args.steps
            if logging or saving or evaluating:
                check_finite_loss(trainer, bad_step)
            if logging:
                (loss,) = trainer._all_reduce(loss_sum.item() / since)
                now = time.perf_counter()
                entry = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_step * since / (now - t_last),
                         "mem_gb": memory_gb(device)}
                if trainer.peak:
                    entry["mfu"] = entry["tokens_per_s"] * trainer.flops_per_token / (trainer.peak * d.world)
                loss_sum.zero_()
                t_last, since = now, 0
                write_metrics(metrics_file, entry)
                bar.set_postfix_str(progress_text(entry))
            if evaluating:
                entry = {"step": step, **trainer.evaluate()}
                write_metrics(metrics_file, entry)
                if d.main:
                    bar.write(f"step {step}: val loss {entry['val_loss']:.4f}, accuracy {entry['val_accuracy']:.3f}")
                t_last = time.perf_counter()  # the evaluation's time is not training time
            if saving:
                trainer.save(out / CHECKPOINT)
    except KeyboardInterrupt:
        # An interruption between steps keeps the last completed one, as --stop-at would.
        bar.close()
        check_finite_loss(trainer, bad_step)
        if d.main:
            print(f"interrupted: saving step {trainer.step} to {out / CHECKPOINT}", file=sys.stderr)
        trainer.save(out / CHECKPOINT)
        raise
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    check_finite_loss(trainer, bad_step)
    trainer.save(out / CHECKPOINT)
    if d.main:
        plot_losses(read_metrics(out / METRICS), out / "loss.png")
        print(f"step {trainer.step}/{args.steps}: checkpoint, metrics and loss.png in {out}")


def check_finite_loss(trainer: Trainer, bad_step: torch.Tensor) -> None:
    """Stop before a non-finite loss reaches the metrics or a checkpoint (the weights are ruined)."""
    local = int(bad_step.item())
    (any_bad,) = trainer._all_reduce(float(local))
    if any_bad:
        where = f"step {local}" if local else "a step of another process"
        raise TrainError(
            f"the loss is not finite at {where} (lower --lr, clip gradients with --grad-clip, "
            "or use another --dtype); no checkpoint was written after it"
        )


def write_metrics(file, entry: dict) -> None:
    if file is not None:
        file.write(json.dumps(entry) + "\n")
        file.flush()


def progress_text(entry: dict) -> str:
    text = f"loss {entry['loss']:.4f} | {entry['tokens_per_s']:,.0f} tok/s"
    if "mfu" in entry:
        text += f" | MFU {100 * entry['mfu']:.1f}%"
    return text + f" | mem {entry['mem_gb']:.2f} GB"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (TrainError, DataError) as exc:
        print(f"python -m fastattn.train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
