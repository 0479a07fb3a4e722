"""calibrate/: measure prefill, decode, training, data-movement and co-run kernels of a model on this
machine and write a cost-table directory the simulator uses directly (``simcolo costs.path=DIR``).

``python -m calibrate model=<name> device=<cpu|cuda> out=<dir>`` measures (Hydra; ``conf/calibrate.yaml``),
``python -m calibrate.report <dir>`` prints how well the tables predict held-out points. The model and
kernels are the live replay's own, from ``simcolo/engine/`` (a Llama-family decoder built from
``conf/model``, random weights, LoRA, the serving KV cache and runner); the table format is
``simcolo/costs/FORMAT.md``.
"""
