"""``pirl sweep``: grids over config keys and seeds, evaluated with kNN and the linear probe.

==========  ===================================================================================
spec        SweepSpec / Series / Value / Cell, the presets (SWEEPS), cell configs, GPU assignment
run         run_sweep: each cell pretrained, evaluated, recorded (result.json); resume; GPUs
report      write_summary: markdown table + plot from the cells' results; the paper's numbers
cli         the ``pirl sweep`` command
==========  ===================================================================================
"""

from pirl.sweep.spec import SWEEPS, Cell, Scale, Series, SweepSpec, Value

__all__ = ["SWEEPS", "Cell", "Scale", "Series", "SweepSpec", "Value"]
