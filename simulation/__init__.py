"""Simulation harness: codec sweeps through Flower's simulation engine, reports and benchmarks."""

from fedsqueeze.simulation.grid import Cell, Grid, load_grid, parse_grid
from fedsqueeze.simulation.report import summarize, write_report
from fedsqueeze.simulation.sweep import SimulationRunner, collect_results, run_sweep

__all__ = [
    "Cell",
    "SimulationRunner",
    "Grid",
    "collect_results",
    "load_grid",
    "parse_grid",
    "run_sweep",
    "summarize",
    "write_report",
]
