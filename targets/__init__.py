"""Target specs (``specs/*.toml``), transports to reach a device's agent, and the agent client.

    from edgebuild.targets import load_target, transport_for
    from edgebuild.targets.client import AgentClient

Importing this package loads neither paramiko nor the agent client: transports register lazily.
"""
from edgebuild.targets.spec import (
    Budgets, Connection, LabgridSpec, RuntimeSpec, Target, Timing, gate_applies,
    latency_gate_applies, load_target, measurement_label, parse_target, target_names, targets,
)
from edgebuild.targets.transport import Transport, transport_for, transports

__all__ = ["Budgets", "Connection", "LabgridSpec", "RuntimeSpec", "Target", "Timing", "Transport",
           "gate_applies", "latency_gate_applies", "load_target", "measurement_label", "parse_target",
           "target_names", "targets", "transport_for", "transports"]
