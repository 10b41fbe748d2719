"""ABFT training loop: only W_Q and W_K move, through accelerate, with the PID-steered loss.

The trainer uses only public APIs: ``abft_fast.hf`` (probes on a HuggingFace model whose
attention implementation is "abft_fast"), nothing of the kernels.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field

import torch

from ..hf.quant import is_4bit, keep_differentiable
from . import data
from .config import TrainConfig
from .loss import abft_loss, multi_query_loss
from .objective import ProbeForward
from .params import add_lora, freeze_all_but_qk, load_qk, qk_parameters, save_qk, unwrap
from .pid import PID

__all__ = ["TrainConfig", "TrainResult", "add_lora", "checkpointed_layers_train_mode",
           "enable_gradient_checkpointing",
           "encode_training_prompts", "freeze_all_but_qk", "load_qk", "qk_parameters", "save_qk",
           "train", "unwrap"]


@dataclass
class TrainResult:
    history: list = field(default_factory=list)  # per step: loss, A, passing, mass_correct, ...
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    model: object = None                          # the trained model (LoRA-wrapped with --lora)
    sharded: bool = False                         # its weights are FSDP2-sharded (fsdp=True)


@dataclass
class StepSums:
    """What one optimizer step accumulates over its micro-batches (summed over samples)."""
    loss: float = 0.0           # loss x samples
    passing: float = 0.0        # heads passing the induction-head filter
    mass_correct: float = 0.0   # last-row attention on correct labels, mean over layers / rows
    mass_wrong: float = 0.0
    samples: float = 0.0

    FIELDS = ("loss", "passing", "mass_correct", "mass_wrong", "samples")

    def add(self, out, n: int) -> None:
        for f, v in zip(self.FIELDS, self.values(out, n)):
            setattr(self, f, getattr(self, f) + v)

    @staticmethod
    def values(out, n: int) -> list:
        """One micro-batch's contribution, in ``FIELDS`` order."""
        return [out.loss.item() * n, out.passing.sum().item(),
                out.mass_correct.mean((0, 2)).sum().item(),
                out.mass_wrong.mean((0, 2)).sum().item(), float(n)]

    @classmethod
    def from_slots(cls, slots, accelerator) -> StepSums:
        """The step's sums from per-micro-batch slots [n_micro, fields] (each filled by the one
        process that ran that micro-batch, zeros elsewhere): summed over the processes, then over
        the micro-batches in order, so any number of processes gives the same float64 sums."""
        t = slots.to(accelerator.device)
        if accelerator.num_processes > 1:
            t = accelerator.reduce(t, "sum")
        t = t.cpu()
        out = cls()
        for row in t.tolist():
            for f, v in zip(cls.FIELDS, row):
                setattr(out, f, getattr(out, f) + v)
        return out

    def reduced(self, accelerator) -> StepSums:
        """Summed over the processes."""
        t = torch.tensor([getattr(self, f) for f in self.FIELDS], dtype=torch.float64)
        t = accelerator.reduce(t.to(accelerator.device), "sum").cpu()
        return StepSums(*t.tolist())

    def record(self, step: int, a: float, seconds: float) -> dict:
        n = self.samples
        return {"step": step, "loss": self.loss / n, "A": a, "passing_heads": self.passing / n,
                "loss_per_passing_head": self.loss / max(self.passing, 1.0),
                "mass_correct": self.mass_correct / n, "mass_wrong": self.mass_wrong / n,
                "seconds": seconds}


def make_accelerator(**kw):
    """An ``accelerate.Accelerator`` that also joins a multi-process CPU run.

    accelerate treats ``torchrun`` on a machine without an accelerator as ONE process per
    launcher process unless told to use the CPU (``accelerate launch --cpu`` does;
    plain ``torchrun`` does not), so that every process would train alone on the whole batch.
    Here ``cpu=True`` is set when several processes were launched and no CUDA device exists:
    they then form one gloo group."""
    import os

    from accelerate import Accelerator
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and "cpu" not in kw and not torch.cuda.is_available():
        kw["cpu"] = True
    acc = Accelerator(**kw)
    if world > 1 and acc.num_processes != world:
        raise RuntimeError(f"WORLD_SIZE is {world} but accelerate set up {acc.num_processes} "
                           f"process(es) ({acc.distributed_type}); launch with accelerate launch "
                           "or torchrun on a supported device")
    return acc


def _distributed_type(acc) -> str:
    """accelerate's distributed type as a bare name ("NO", "MULTI_CPU", "FSDP", "DEEPSPEED", ...)."""
    return str(getattr(acc, "distributed_type", "")).rsplit(".", 1)[-1]


def is_sharded(acc) -> bool:
    """FSDP or DeepSpeed: the weights are partitioned over the processes, so every forward
    (evaluation included) must run on all of them."""
    return _distributed_type(acc) in ("FSDP", "DEEPSPEED")


def full_qk_state(model) -> dict:
    """id(parameter) -> full (unsharded, CPU) tensor of every trainable parameter, for
    ``save_qk(model, path, full=...)``. Under FSDP2 the parameters are DTensors whose
    ``full_tensor()`` all-gathers, so every process must call this (untested on GPUs)."""
    out = {}
    for p in model.parameters():
        if p.requires_grad:
            t = p.detach()
            out[id(p)] = (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu().clone()
    return out


def enable_gradient_checkpointing(model) -> None:
    """HF activation checkpointing of every decoder layer, non-reentrant (the only kind the probe
    recorder supports: its forward keeps the autograd graph)."""
    lm = unwrap(model)
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(lm).__name__} does not support gradient checkpointing")
    kw = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def checkpointed_layers_train_mode(model) -> None:
    """HF checkpoints a layer only in training mode: after ``model.eval()``, put the checkpointed
    layers themselves (not their dropout children) back in training mode."""
    for m in unwrap(model).modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            m.training = True


class _Order:
    """The training data order: reshuffled permutations of the prompts, drawn from the end.
    Its state (the RNG's and the current permutation) goes into training checkpoints."""

    def __init__(self, n: int, seed: int):
        self.n, self.rng, self.order = n, random.Random(seed), []

    def take(self, k: int) -> list:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out

    def state(self) -> dict:
        return {"rng": self.rng.getstate(), "order": list(self.order)}

    def load(self, st: dict) -> None:
        v, internal, gauss = st["rng"]
        self.rng.setstate((v, tuple(internal), gauss))
        self.order = list(st["order"])


def _named_trainable(model) -> list:
    return [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]


def check_gradients(named, step: int) -> None:
    """Raise if a trainable parameter has no gradient after a step's backward: nothing would train
    it and the optimiser would skip it silently (e.g. a layer whose probes never reach the loss,
    or sharded weights that were never reduce-scattered). ``named``: (name, parameter) pairs."""
    missing = [n for n, p in named if p.grad is None]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise RuntimeError(
            f"step {step}: {len(missing)} of {len(named)} trainable parameters received no gradient "
            f"({shown}); the optimiser would leave them unchanged. Their layers' probes do not "
            "reach the loss (a layer outside the probed ones, a detached weight, or a distributed "
            "wrapper that did not gather / reduce their gradients).")


def _check_state(state, named, opt):
    """Everything a checkpoint's state must satisfy before any of it is applied."""
    from .checkpoint import CheckpointError
    w = state.get("trainable")
    if not isinstance(w, dict) or set(w) != {n for n, _ in named}:
        raise CheckpointError("checkpoint: its trainable tensors are not this model's")
    for n, p in named:
        if tuple(w[n].shape) != tuple(p.shape) or w[n].dtype != p.dtype:
            raise CheckpointError(f"checkpoint: {n} is {tuple(w[n].shape)} {w[n].dtype}, the model "
                                  f"{tuple(p.shape)} {p.dtype}")
    osd = state.get("optimizer")
    groups = opt.state_dict()["param_groups"]
    if (not isinstance(osd, dict) or len(osd.get("param_groups", [])) != len(groups)
            or [len(g["params"]) for g in osd["param_groups"]] != [len(g["params"]) for g in groups]):
        raise CheckpointError("checkpoint: its optimiser state does not fit this run's parameters")
    for i, (_, p) in enumerate(named):
        for k, v in osd.get("state", {}).get(i, {}).items():
            if k != "step" and isinstance(v, torch.Tensor) and v.shape != p.shape:
                raise CheckpointError(f"checkpoint: optimiser state {k} of parameter {i} has "
                                      f"shape {tuple(v.shape)}, the parameter {tuple(p.shape)}")
    for key in ("pid", "data_order", "history", "step"):
        if key not in state:
            raise CheckpointError(f"checkpoint: no {key!r} in its state")


def _fingerprint_config(cfg: TrainConfig) -> dict:
    """The config part of a run's fingerprint; ``multi_query`` only when on, so checkpoints
    written before the option existed still resume."""
    d = asdict(cfg)
    for opt_in in ("multi_query", "fsdp", "fsdp_param_dtype", "fsdp_cpu_offload"):
        if not d.get(opt_in):
            d.pop(opt_in, None)
    return d


def shard_model(model, param_dtype: str = "", cpu_offload: bool = False) -> list:
    """FSDP2 on ``model`` (a transformers model): ``fully_shard`` on each decoder layer (the classes
    in ``_no_split_modules``), then on the model itself, default resharding. Needs an initialised
    process group. param_dtype: "bfloat16" / "float16" parameters in forward and backward with
    float32 gradient reductions (``MixedPrecisionPolicy``); cpu_offload: ``CPUOffloadPolicy``
    (both need GPUs: on CPU processes gloo aborts on 16-bit all-gathers and offloading needs an
    accelerator). Returns the sharded layers."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    kw = {}
    if (param_dtype or cpu_offload) and not torch.cuda.is_available():
        raise RuntimeError("fsdp mixed precision and CPU offload need GPUs (on CPU processes gloo "
                           "aborts on 16-bit all-gathers and offloading needs an accelerator)")
    if param_dtype:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=getattr(torch, param_dtype),
                                               reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    lm = unwrap(model)
    names = set(getattr(lm, "_no_split_modules", None) or [])
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"fsdp: {type(lm).__name__} names no decoder layer class in "
                         "_no_split_modules; shard it with fully_shard yourself")
    for m in layers:
        fully_shard(m, **kw)
    fully_shard(lm, **kw)
    return layers


def encode_training_prompts(model, tokenizer, task: data.Task, cfg: TrainConfig):
    """The run's training prompts (cfg.train_prompts of k demonstrations, drawn with cfg.seed),
    encoded with their label positions and truncated to the model's context: (encoded, pad id)."""
    prompts = data.training_prompts(task, cfg.train_prompts, cfg.k, cfg.seed)
    label_ids = data.label_token_ids(tokenizer, task.label_words, task.template.label_prefix)
    encoded = data.encode(tokenizer, prompts, label_ids=label_ids,
                          max_length=data.context_length(unwrap(model), cfg.max_length),
                          truncate=True)
    return encoded, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def train(model, tokenizer, task: data.Task, cfg: TrainConfig, progress=True, accelerator=None,
          save_every: int = 0, checkpoint_dir=None, resume=None, on_step=None):
    """ABFT on ``task``'s pool prompts. Returns a ``TrainResult``; trains ``model`` in place.

    save_every: write a training checkpoint every that many steps (and after the last) into
      ``checkpoint_dir`` (see :mod:`.checkpoint`; only the main process writes).
    resume: a checkpoint directory (or a directory of them: the newest) to continue from; it must
      come from this config (``steps`` may differ), model and data, else ``CheckpointError``.
    on_step: called as ``on_step(step, record)`` after each step (and its checkpoint).
    Under several processes (``accelerate launch`` / ``torchrun``) each runs every
    ``num_processes``-th micro-batch of a step; the gradients are averaged by DDP and the step's
    sums gathered per micro-batch, so the history equals the one-process history of the same
    global batch.
    """
    from accelerate.utils import set_seed

    from .checkpoint import fingerprint, load_checkpoint, save_checkpoint
    cfg.check()
    if not isinstance(save_every, int) or save_every < 0:
        raise ValueError(f"save_every must be an int >= 0; got {save_every!r}")
    if save_every and checkpoint_dir is None:
        raise ValueError("save_every > 0 needs a checkpoint_dir")
    set_seed(cfg.seed)
    if is_4bit(model):
        if not cfg.lora:
            raise ValueError("the model is 4-bit (bitsandbytes): its W_Q / W_K are quantised and "
                             "cannot train; use lora=True (QLoRA: LoRA on q/k over the 4-bit base)")
        if cfg.fsdp:
            raise ValueError("fsdp=True with a 4-bit model: FSDP2 does not shard bitsandbytes "
                             "4-bit weights here; use one process per GPU (DDP)")
        # bitsandbytes' CPU inference kernel has no backward: off, whoever loaded the model, and
        # undone where an evaluation already repacked weights for it
        keep_differentiable(model)
    if cfg.lora:
        model = add_lora(model, cfg.lora_r)
    freeze_all_but_qk(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    lm = unwrap(model)
    encoded, pad = encode_training_prompts(model, tokenizer, task, cfg)

    n_micro = cfg.batch // cfg.micro_batch
    acc = accelerator or make_accelerator()
    if n_micro % acc.num_processes:
        raise ValueError(f"batch / micro_batch = {n_micro} must be a multiple of the "
                         f"{acc.num_processes} processes")
    acc.gradient_accumulation_steps = n_micro // acc.num_processes
    acc.step = 0
    named = _named_trainable(model)
    if (is_sharded(acc) or cfg.fsdp) and (save_every or resume is not None):
        raise NotImplementedError(
            f"--save-every / --resume are not supported under "
            f"{'--fsdp' if cfg.fsdp else acc.distributed_type} (sharded optimiser state); use "
            "DDP (torchrun or accelerate launch --multi_gpu without --fsdp) for resumable runs")
    if cfg.fsdp and is_sharded(acc):
        raise ValueError(f"fsdp=True shards the model itself; the accelerator is already set up "
                         f"for {acc.distributed_type}: use one or the other")
    fp = fingerprint(_fingerprint_config(cfg), lm, named, encoded, task.name)
    if cfg.fsdp:
        if not torch.distributed.is_initialized():
            import os
            if "MASTER_ADDR" not in os.environ:
                raise RuntimeError("fsdp=True needs a process group: launch with torchrun (one "
                                   "process is fine: torchrun --nproc_per_node 1)")
            torch.distributed.init_process_group(
                "nccl" if torch.cuda.is_available() else "gloo")
        shard_model(model, cfg.fsdp_param_dtype, cfg.fsdp_cpu_offload)
        named = _named_trainable(model)  # the sharded (DTensor) parameters
    params = [p for p in model.parameters() if p.requires_grad]
    if [id(p) for p in params] != [id(p) for _, p in named]:  # pragma: no cover - sanity
        raise RuntimeError("trainable parameters are not in a stable order")
    opt = torch.optim.Adam(params, lr=cfg.lr)
    order = _Order(len(encoded), cfg.seed)
    pid = PID(cfg.a0, cfg.cp, cfg.ci, cfg.cd, enabled=cfg.use_pid)
    result = TrainResult(config=asdict(cfg))
    start = 0
    if resume is not None:
        state, meta = load_checkpoint(resume, fp)  # raises before anything is applied
        _check_state(state, named, opt)
        if state["step"] > cfg.steps:
            from .checkpoint import CheckpointError
            raise CheckpointError(f"checkpoint is at step {state['step']} > steps {cfg.steps}")
        with torch.no_grad():
            for n, p in named:
                p.copy_(state["trainable"][n])
        opt.load_state_dict(state["optimizer"])
        pid.a, pid.history = float(state["pid"]["a"]), list(state["pid"]["history"])
        order.load(state["data_order"])
        torch.set_rng_state(state["torch_rng"])
        result.history = list(state["history"])
        start = int(state["step"])
    a = pid.a
    objective = ProbeForward(model, cfg.stop_early)
    if cfg.fsdp:  # sharded by shard_model: no DDP wrapper; FSDP2 averages the gradients
        opt = acc.prepare(opt)
    else:
        objective, opt = acc.prepare(objective, opt)
    # The parameters as prepared (a sharding wrapper may have replaced them), checked for a
    # gradient every step: one process, DDP and FSDP2 (DTensor gradients). Not under DeepSpeed or
    # FSDP1, which keep gradients in their own flat buffers (p.grad is None by design there).
    kind = _distributed_type(acc)
    own_buffers = kind == "DEEPSPEED" or (kind == "FSDP" and not getattr(acc, "is_fsdp2", False))
    checked = [] if own_buffers else [
        (n.removeprefix("model."), p)
        for n, p in acc.unwrap_model(objective).named_parameters() if p.requires_grad]
    objective.eval()  # no dropout: the ABFT loss is deterministic; gradients flow in eval mode
    if cfg.gradient_checkpointing:
        checkpointed_layers_train_mode(lm)

    def save(step):
        st = {"step": step, "trainable": {n: p.detach().cpu().clone() for n, p in named},
              "optimizer": opt.state_dict(),
              "pid": {"a": pid.a, "history": list(pid.history)}, "data_order": order.state(),
              "torch_rng": torch.get_rng_state(), "history": list(result.history),
              "config": asdict(cfg)}
        if acc.is_main_process:
            save_checkpoint(checkpoint_dir, step, st, fp)
        acc.wait_for_everyone()

    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, initial=start, desc=f"ABFT {task.name}", unit="step",
               disable=not progress or not acc.is_main_process)
    t0 = time.perf_counter()
    for step in range(start + 1, cfg.steps + 1):
        ts = time.perf_counter()
        slots = torch.zeros(n_micro, len(StepSums.FIELDS), dtype=torch.float64)
        # The step's samples, sorted by length so micro-batches carry little padding (the
        # accumulated gradient is the same sum whatever the grouping).
        step_items = sorted((encoded[i] for i in order.take(cfg.batch)),
                            key=lambda e: len(e.input_ids))
        for j in range(n_micro):
            items = step_items[j * cfg.micro_batch:(j + 1) * cfg.micro_batch]
            if j % acc.num_processes != acc.process_index:
                continue
            collate = data.collate_multi_query if cfg.multi_query else data.collate
            b = collate(items, pad).to(acc.device)
            with acc.accumulate(objective):
                probs = objective(b.input_ids, b.attention_mask, b.rows, b.cols)
                if cfg.multi_query:
                    out = multi_query_loss(probs, b.row_correct, b.row_valid, b.row_lengths,
                                           b.row_active, A=a, B=cfg.b, use_filter=cfg.use_filter)
                else:
                    valid = b.cols >= 0
                    out = abft_loss(probs, b.correct, valid, b.lengths, A=a, B=cfg.b,
                                    use_filter=cfg.use_filter)
                acc.backward(out.loss)
                if acc.sync_gradients and checked:
                    check_gradients(checked, step)
                opt.step()
                opt.zero_grad(set_to_none=True)
            slots[j] = torch.tensor(StepSums.values(out, len(items)), dtype=torch.float64)
            del probs, out  # free this micro-batch's graph before the next forward
        totals = StepSums.from_slots(slots, acc)
        rec = totals.record(step, a, time.perf_counter() - ts)
        result.history.append(rec)
        a = pid.update(rec["passing_heads"])
        bar.set_postfix(loss=f"{rec['loss']:.3f}", A=f"{rec['A']:.3f}",
                        heads=f"{rec['passing_heads']:.1f}")
        bar.update(1)
        if save_every and (step % save_every == 0 or step == cfg.steps):
            save(step)
        if on_step is not None:
            on_step(step, rec)
    bar.close()
    result.seconds = time.perf_counter() - t0
    result.model = acc.unwrap_model(objective).model
    result.sharded = cfg.fsdp
    return result
