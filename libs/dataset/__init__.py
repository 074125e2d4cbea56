"""The prepared-dataset contract between dataprep and its readers (the trainer, serving's
tools, benchmarks): the shard schemas, Arrow IPC framing, and the dataprep client."""
