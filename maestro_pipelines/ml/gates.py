"""Quality gates: what a newly trained model must pass before it is registered and deployed.

Two gates, each a blocking check of the `model_evaluation` asset and a key of the
`model_versions.gate_results` the platform database records:

- `metric_floors`: every metric reaches the tenant's floor (`tenants.settings.gates`, else
  `objectives.DEFAULT_GATES`);
- `no_regression_vs_production`: no metric falls below the production model's by more than
  the tenant's tolerance (`objectives.DEFAULT_REGRESSION_TOLERANCE` unless set).

A NaN metric fails both (it is no evidence the model is good). Pure and Dagster-free: the
asset hands in the metrics and the production model's, and publishes the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

METRIC_FLOORS_CHECK = "metric_floors"
NO_REGRESSION_CHECK = "no_regression_vs_production"

NAN = float("nan")


def floor_failures(metrics: dict[str, float], floors: dict[str, float]) -> dict[str, dict]:
    """The metrics below their floor (a missing or NaN metric fails): name -> value, floor."""
    return {
        name: {"value": metrics.get(name), "floor": floor}
        for name, floor in floors.items()
        if not (metrics.get(name, NAN) >= floor)  # NaN fails too
    }


def production_baseline(run_metrics: dict[str, float]) -> dict[str, float]:
    """The production model's held-out metrics from its MLflow run's (`test_<metric>`)."""
    return {k[len("test_"):]: v for k, v in run_metrics.items() if k.startswith("test_")}


def regressions(metrics: dict[str, float], baseline: dict[str, float], tolerance: float) -> dict[str, dict]:
    """The metrics that fell below the baseline by more than `tolerance`: name -> value, production, tolerance."""
    return {
        name: {"value": metrics.get(name, NAN), "production": old, "tolerance": tolerance}
        for name, old in baseline.items()
        if not (metrics.get(name, NAN) >= old - tolerance)  # NaN regresses too
    }


@dataclass
class GateVerdict:
    """Both gates' outcome for one evaluation."""

    floors: dict[str, float]
    floor_failures: dict[str, dict]
    tolerance: float
    production_version: Optional[int] = None
    """None: no production model yet, nothing to regress against."""
    baseline: dict[str, float] = field(default_factory=dict)
    regressions: dict[str, dict] = field(default_factory=dict)

    @property
    def floors_passed(self) -> bool:
        return not self.floor_failures

    @property
    def no_regression(self) -> bool:
        return not self.regressions

    def results(self) -> dict[str, dict]:
        """What `model_versions.gate_results` records (and the deployment page shows)."""
        return {
            METRIC_FLOORS_CHECK: {"passed": self.floors_passed, "failures": self.floor_failures},
            NO_REGRESSION_CHECK: {"passed": self.no_regression, "failures": self.regressions,
                                  "production_version": self.production_version},
        }

    def floors_summary(self) -> str:
        if self.floors_passed:
            return "all metrics reach their floors"
        return "; ".join(f"{name} {f['value']:.3f} < floor {f['floor']:.3f}" for name, f in self.floor_failures.items())

    def regression_summary(self) -> str:
        if self.production_version is None:
            return "no production model yet"
        if self.no_regression:
            return f"no regression against production version {self.production_version}"
        return "; ".join(f"{name} {r['value']:.3f} < production {r['production']:.3f} - {r['tolerance']}"
                         for name, r in self.regressions.items())


def judge_gates(metrics: dict[str, float], floors: dict[str, float], tolerance: float,
                production_version: Optional[int] = None,
                production_run_metrics: Optional[dict[str, float]] = None) -> GateVerdict:
    """Both gates for `metrics`. `production_run_metrics`: the production model's MLflow run
    metrics (None or empty: no baseline, nothing regresses)."""
    baseline = production_baseline(production_run_metrics or {})
    return GateVerdict(floors, floor_failures(metrics, floors), tolerance, production_version,
                       baseline, regressions(metrics, baseline, tolerance))
