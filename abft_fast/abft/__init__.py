"""The ABFT method (Cho et al. 2025) on the public APIs: StaICC data and prompts, the loss with
its induction-head filter, the PID controller, the objective's forward, the trainer, the
evaluator, plots and the ``abft-fast`` CLI."""
