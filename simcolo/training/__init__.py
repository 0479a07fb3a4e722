"""Pipeline-parallel training: schedules (which operation each stage runs, in order) and a SimPy model
of one synchronous training step on GPUs. The co-location policies build on these (a later issue)."""
