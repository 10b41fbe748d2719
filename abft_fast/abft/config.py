"""The ABFT training configuration (paper defaults, Cho et al. 2025)."""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    k: int = 4
    train_prompts: int = 512
    steps: int = 32
    batch: int = 32            # pseudo-batch: samples per optimizer step
    micro_batch: int = 4       # samples per forward; gradient accumulation = batch / micro_batch
    lr: float = 2e-5
    a0: float = 0.5
    b: float = 1.0
    use_filter: bool = True
    use_pid: bool = True
    cp: float = 0.03
    ci: float = 0.005
    cd: float = 0.005
    seed: int = 0
    lora: bool = False
    lora_r: int = 16
    stop_early: bool = True    # stop the forward after the last probed layer's attention
    gradient_checkpointing: bool = False  # HF non-reentrant activation checkpointing per layer
    max_length: int = 0        # longest prompt in tokens (0 = the model's context); longer
                               # prompts lose leading demonstrations, never the query
    multi_query: bool = False  # beyond the paper: the loss at every demonstration's prediction
                               # row too (data.collate_multi_query, loss.multi_query_loss)
    fsdp: bool = False         # FSDP2: fully_shard every decoder layer and the model itself
                               # (trainer.shard_model), under torchrun on CPU (gloo) or GPUs
    fsdp_param_dtype: str = ""  # with fsdp: "bfloat16" / "float16" parameters in forward and
                               # backward (MixedPrecisionPolicy, float32 reductions); "" = off
    fsdp_cpu_offload: bool = False  # with fsdp: sharded parameters, gradients and Adam state on
                               # the CPU between uses (CPUOffloadPolicy); GPUs only

    def check(self):
        for name in ("k", "train_prompts", "steps", "batch", "micro_batch", "lora_r"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or (
                self.max_length < 0 or self.max_length == 1):
            raise ValueError(f"max_length must be 0 (the model's context) or an int >= 2; got "
                             f"{self.max_length!r}")
        if not isinstance(self.multi_query, bool):
            raise ValueError(f"multi_query must be a bool; got {self.multi_query!r}")
        if not isinstance(self.fsdp, bool):
            raise ValueError(f"fsdp must be a bool; got {self.fsdp!r}")
        if self.fsdp_param_dtype not in ("", "bfloat16", "float16"):
            raise ValueError(f"fsdp_param_dtype must be '', 'bfloat16' or 'float16'; got "
                             f"{self.fsdp_param_dtype!r}")
        if (self.fsdp_param_dtype or self.fsdp_cpu_offload) and not self.fsdp:
            raise ValueError("fsdp_param_dtype / fsdp_cpu_offload need fsdp=True")
        if self.batch % self.micro_batch:
            raise ValueError(f"batch ({self.batch}) must be a multiple of micro_batch "
                             f"({self.micro_batch})")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number; got {self.lr!r}")
        for name in ("a0", "b"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number; got {v!r}")
        return self
