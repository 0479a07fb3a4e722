"""calibrate/: the measurement harness that writes cost and interference tables on a real GPU.

Not built yet (a later issue). The table format it will write is ``simcolo/costs/FORMAT.md``; until
then the simulator runs on the roofline tables shipped in ``simcolo/costs/tables/``.
"""
