"""Load predictors: the next interval's value of a metric series (request rate, prompt and output lengths).

Each predictor sees one value per planner interval (`observe`) and says what it expects for
the next one (`predict`); with nothing observed yet it predicts 0.

- `last`:     the last value. Reacts at once, follows noise too.
- `average`:  the mean of the last `window` values. Smooth, lags a trend by window/2 intervals.
- `trend`:    the least-squares line through the last `window` values, one interval ahead
              (Dynamo's planner has a similar choice of simple predictors). Catches a ramp a
              step early; never below 0; with one value it is `last`.

          value
            |                 x   <- trend: the line through the window, one step on
            |             o
            |        o               o  observed
            |   o                    window = 4
            +---+----+----+----+---- interval
"""

from __future__ import annotations

from collections import deque

PREDICTORS = ("last", "average", "trend")


class Predictor:
    def __init__(self, kind: str = "trend", window: int = 6) -> None:
        if kind not in PREDICTORS:
            raise ValueError(f"predictor {kind!r}: expected one of {', '.join(PREDICTORS)}")
        if window < 1:
            raise ValueError("predictor window must be >= 1")
        self.kind = kind
        self.values: deque[float] = deque(maxlen=1 if kind == "last" else window)

    def observe(self, value: float) -> None:
        self.values.append(float(value))

    def predict(self) -> float:
        v = self.values
        if not v:
            return 0.0
        if self.kind == "last" or len(v) == 1:
            return v[-1]
        if self.kind == "average":
            return sum(v) / len(v)
        n = len(v)
        mean_x, mean_y = (n - 1) / 2, sum(v) / n
        sxx = sum((i - mean_x) ** 2 for i in range(n))
        slope = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(v)) / sxx
        return max(0.0, mean_y + slope * (n - mean_x))  # the line at x = n: one interval after the last
