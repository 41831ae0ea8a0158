"""Which experts are resident, under a memory budget: policies, budget arithmetic, slot
allocation, sensitivity estimation for adaptive gating, the planner's model and telemetry.

Pure numpy; the engine plugs in the real slot pool (edgemoe.pool). See docs/RESIDENCY.md.
"""
from edgemoe.residency.budget import (Budget, MemoryNeeds, SlotPlan, format_bytes, make_plan,
                                      parse_budget, uniform_slots)
from edgemoe.residency.policies import (ExpertPool, FullPolicy, OnDemandPolicy, Policy,
                                        StaticPolicy, SwapPolicy, make_policy)
from edgemoe.residency.telemetry import Telemetry

__all__ = [
    "Budget", "MemoryNeeds", "SlotPlan", "format_bytes", "make_plan", "parse_budget",
    "uniform_slots", "ExpertPool", "FullPolicy", "OnDemandPolicy", "Policy", "StaticPolicy",
    "SwapPolicy", "Telemetry", "make_policy",
]
