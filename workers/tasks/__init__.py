"""Task types: how a trial turns a data set into batches, a loss and metrics."""
