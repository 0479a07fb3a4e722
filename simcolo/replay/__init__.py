"""Live replay: the simulator's policy object drives real kernels on a real device, fed by the same
trace in real time, and writes the same outputs (``python -m simcolo.replay``; compare with
``python -m simcolo.compare <sim run> <replay run>``)."""
