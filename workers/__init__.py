"""Data plane: what runs inside a trial (training loop, methods, tasks, data and models)."""
