"""Searches over the simulator: which policy and split of the GPUs give the most training without breaking
the SLO (``simcolo -m +search=colocation``), and how many GPUs a trace needs (``simcolo -m +search=capacity``).

Both run as Hydra multiruns with Hydra's Optuna sweeper on any Hydra launcher (joblib locally, Ray or
SLURM elsewhere):

* :mod:`simcolo.search.space` -- the co-location search space (policy, layout, intensity, knobs);
* :mod:`simcolo.search.feasibility` -- every trial a config the simulator accepts, checked before launch;
* :mod:`simcolo.search.objectives` -- objectives read from each job's ``summary.json``;
* :mod:`simcolo.search.callbacks` -- the Hydra callbacks that hand them to the sweeper and write the answer;
* :mod:`simcolo.search.pareto` -- the non-dominated runs, ``pareto.csv`` and ``pareto.png``;
* :mod:`simcolo.search.capacity` -- the bisection over the GPU count and ``capacity.csv``.
"""
