"""ABFT training loop: only W_Q and W_K move, through accelerate, with the PID-steered loss.

The trainer uses only public APIs: ``abft_fast.hf`` (probes on a HuggingFace model whose
attention implementation is "abft_fast"), nothing of the kernels.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field

import torch

from . import data
from .config import TrainConfig
from .loss import abft_loss
from .objective import ProbeForward
from .params import add_lora, freeze_all_but_qk, load_qk, qk_parameters, save_qk, unwrap
from .pid import PID

__all__ = ["TrainConfig", "TrainResult", "add_lora", "freeze_all_but_qk", "load_qk",
           "qk_parameters", "save_qk", "train", "unwrap"]


@dataclass
class TrainResult:
    history: list = field(default_factory=list)  # per step: loss, A, passing, mass_correct, ...
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    model: object = None                          # the trained model (LoRA-wrapped with --lora)


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
        self.loss += out.loss.item() * n
        self.passing += out.passing.sum().item()
        self.mass_correct += out.mass_correct.mean((0, 2)).sum().item()
        self.mass_wrong += out.mass_wrong.mean((0, 2)).sum().item()
        self.samples += n

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


def train(model, tokenizer, task: data.Task, cfg: TrainConfig, progress=True, accelerator=None):
    """ABFT on ``task``'s pool prompts. Returns a ``TrainResult``; trains ``model`` in place."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    cfg.check()
    set_seed(cfg.seed)
    if cfg.lora:
        model = add_lora(model, cfg.lora_r)
    freeze_all_but_qk(model)
    prompts = data.training_prompts(task, cfg.train_prompts, cfg.k, cfg.seed)
    label_ids = data.label_token_ids(tokenizer, task.label_words, task.template.label_prefix)
    encoded = data.encode(tokenizer, prompts, label_ids=label_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    n_micro = cfg.batch // cfg.micro_batch
    acc = accelerator or Accelerator(gradient_accumulation_steps=1)
    if n_micro % acc.num_processes:
        raise ValueError(f"batch / micro_batch = {n_micro} must be a multiple of the "
                         f"{acc.num_processes} processes")
    acc.gradient_accumulation_steps = n_micro // acc.num_processes
    acc.step = 0
    objective = ProbeForward(model, cfg.stop_early)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    objective, opt = acc.prepare(objective, opt)
    objective.eval()  # no dropout: the ABFT loss is deterministic; gradients flow in eval mode

    rng = random.Random(cfg.seed)
    order: list = []

    def next_items(n):
        nonlocal order
        out = []
        while len(out) < n:
            if not order:
                order = list(range(len(encoded)))
                rng.shuffle(order)
            out.append(encoded[order.pop()])
        return out

    pid = PID(cfg.a0, cfg.cp, cfg.ci, cfg.cd, enabled=cfg.use_pid)
    a = cfg.a0
    result = TrainResult(config=asdict(cfg))
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, desc=f"ABFT {task.name}", unit="step",
               disable=not progress or not acc.is_main_process)
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        ts = time.perf_counter()
        totals = StepSums()
        # The step's samples, sorted by length so micro-batches carry little padding (the
        # accumulated gradient is the same sum whatever the grouping).
        step_items = sorted(next_items(cfg.batch), key=lambda e: len(e.input_ids))
        for j in range(n_micro):
            items = step_items[j * cfg.micro_batch:(j + 1) * cfg.micro_batch]
            if j % acc.num_processes != acc.process_index:
                continue
            b = data.collate(items, pad).to(acc.device)
            with acc.accumulate(objective):
                probs = objective(b.input_ids, b.attention_mask, b.rows, b.cols)
                valid = b.cols >= 0
                out = abft_loss(probs, b.correct, valid, b.lengths, A=a, B=cfg.b,
                                use_filter=cfg.use_filter)
                acc.backward(out.loss)
                opt.step()
                opt.zero_grad(set_to_none=True)
            totals.add(out, len(items))
        totals = totals.reduced(acc)
        rec = totals.record(step, a, time.perf_counter() - ts)
        result.history.append(rec)
        a = pid.update(rec["passing_heads"])
        bar.set_postfix(loss=f"{rec['loss']:.3f}", A=f"{rec['A']:.3f}",
                        heads=f"{rec['passing_heads']:.1f}")
        bar.update(1)
    bar.close()
    result.seconds = time.perf_counter() - t0
    result.model = acc.unwrap_model(objective).model
    return result
