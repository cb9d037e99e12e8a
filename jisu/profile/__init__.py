"""Where a run's time goes and how far it is from the hardware's limits: an analytical roofline model of each
engine step (roofline), the machine's measured limits (calibrate), cycle counts (cycles), and memory estimates
made before loading (estimate).

NOTE: the functions calibrate.calibrate and estimate.estimate are not re-exported here: under the same names
they would shadow their modules (`from jisu.profile import calibrate` must give the module).
"""

# Lazy (PEP 562): the engine imports jisu.profile.timeline on every start, and this package's other modules
# (roofline, calibration, estimates; the last reads GGUF headers) are for `jisu profile` and friends.
_EXPORTS = {
    "Calibration": "calibrate", "load_calibration": "calibrate", "read_cpu_clock": "calibrate",
    "CycleCount": "cycles", "count_cycles": "cycles", "counter_status": "cycles",
    "Estimate": "estimate",
    "SeqWork": "roofline", "StepCost": "roofline", "Verdict": "roofline", "WeightFormat": "roofline",
    "decode_cost": "roofline", "prefill_cost": "roofline", "roofline_verdict": "roofline",
    "seq_work_from_step": "roofline", "step_cost": "roofline",
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jisu.profile' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"jisu.profile.{module}"), name)


__all__ = [
    "Calibration", "CycleCount", "Estimate", "SeqWork", "StepCost", "Verdict", "WeightFormat", "count_cycles",
    "counter_status", "decode_cost", "load_calibration", "prefill_cost", "read_cpu_clock", "roofline_verdict",
    "seq_work_from_step", "step_cost",
]
