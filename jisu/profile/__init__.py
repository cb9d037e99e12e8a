"""Where a run's time goes and how far it is from the hardware's limits: an analytical roofline model of each
engine step (roofline), the machine's measured limits (calibrate), cycle counts (cycles), and memory estimates
made before loading (estimate).

NOTE: the functions calibrate.calibrate and estimate.estimate are not re-exported here: under the same names
they would shadow their modules (`from jisu.profile import calibrate` must give the module).
"""

from jisu.profile.calibrate import Calibration, load_calibration, read_cpu_clock
from jisu.profile.cycles import CycleCount, count_cycles, counter_status
from jisu.profile.estimate import Estimate
from jisu.profile.roofline import (
    SeqWork,
    StepCost,
    Verdict,
    WeightFormat,
    decode_cost,
    prefill_cost,
    roofline_verdict,
    seq_work_from_step,
    step_cost,
)

__all__ = [
    "Calibration", "CycleCount", "Estimate", "SeqWork", "StepCost", "Verdict", "WeightFormat", "count_cycles",
    "counter_status", "decode_cost", "load_calibration", "prefill_cost", "read_cpu_clock", "roofline_verdict",
    "seq_work_from_step", "step_cost",
]
