"""Target specs (``specs/*.toml``), transports to reach a device's agent, and the agent client.

    from edgebuild.targets import load_target, transport_for
    from edgebuild.targets.client import AgentClient

Importing this package loads neither paramiko nor the agent client: transports register lazily.
"""
from edgebuild.targets.spec import (
    Budgets, Connection, RuntimeSpec, Target, Timing, load_target, parse_target, targets,
)
from edgebuild.targets.transport import Transport, transport_for, transports

__all__ = ["Budgets", "Connection", "RuntimeSpec", "Target", "Timing", "Transport", "load_target",
           "parse_target", "targets", "transport_for", "transports"]
