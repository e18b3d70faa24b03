"""What serves the method files and the commands at the top level: tile and slide I/O, checkpoints,
the command-line vocabulary and its one error path, logs and plots, speed counters, and the registry
of the benchmark's feature extractors. Nothing here is in the paper; read the top-level files first."""
