"""Cost tables (schema, loading, validation), the interpolating CostModel, the training costs and co-run
interference read from the same directories, and the roofline generator.

See FORMAT.md in this directory for the on-disk format.
"""
from simcolo.costs.cost_model import CostModel, cost_model_for
from simcolo.costs.interference_table import InterferenceTable
from simcolo.costs.interp import MIN_LATENCY_S, OffGridWarning
from simcolo.costs.schema import SCHEMA_VERSION, table_dir_name
from simcolo.costs.training_costs import TrainingCosts

__all__ = ["CostModel", "cost_model_for", "InterferenceTable", "TrainingCosts", "OffGridWarning",
           "MIN_LATENCY_S", "SCHEMA_VERSION", "table_dir_name"]
