"""PID controller steering ABFT's wrong-label weight A from the count of passing heads."""
from __future__ import annotations


class PID:
    """A_t = A_{t-1} + Cp (n_t - n_{t-1}) + Ci sum_{i=2..t} (n_i - n_{i-1})
    + Cd (n_t - 2 n_{t-1} + n_{t-2}), applied for t > 2 (steps count from 1).

    ``update(n_t)`` takes step t's mean number of passing heads per sample and returns A_t,
    the weight for the next step. With ``enabled=False`` A stays at its start value.
    """

    def __init__(self, a0=0.5, cp=0.03, ci=0.005, cd=0.005, enabled=True):
        self.a = float(a0)
        self.cp, self.ci, self.cd = float(cp), float(ci), float(cd)
        self.enabled = bool(enabled)
        self.history: list[float] = []  # n_1, n_2, ...

    @property
    def t(self):
        return len(self.history)

    def update(self, n_t: float) -> float:
        self.history.append(float(n_t))
        h, t = self.history, self.t
        if self.enabled and t > 2:
            integral = sum(h[i] - h[i - 1] for i in range(1, t))  # i = 2..t in 1-based steps
            self.a += (self.cp * (h[-1] - h[-2]) + self.ci * integral
                       + self.cd * (h[-1] - 2 * h[-2] + h[-3]))
        return self.a
