"""The policy: offline labels, router training, calibration of τ for a budget (or with a guarantee), the report.

The router itself is a model component (`visor.modeling.router`), so `configuration="auto"` works in the
model's forward and `generate()`; this package produces and judges it.
"""

from visor.policy.calibration import Outcome, calibrate, fixed_outcome, oracle_outcome, router_outcome, sweep
from visor.policy.guarantee import Guarantee, certify
from visor.policy.labels import LabelTable, label_configurations, model_fingerprint, router_features
from visor.policy.report import policy_report, write_report
from visor.policy.training import cheapest_good, fit_novelty_guard, train_router

__all__ = [
    "Guarantee", "LabelTable", "Outcome", "calibrate", "certify", "cheapest_good", "fit_novelty_guard", "fixed_outcome",
    "label_configurations", "model_fingerprint", "oracle_outcome", "policy_report", "router_features",
    "router_outcome", "sweep", "train_router", "write_report",
]
