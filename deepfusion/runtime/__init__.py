"""Where and how things run: device, precision, memory, seeds, torchrun, Dask and worker pools."""
