"""How a run runs: resumable checkpoints, data parallel processes, progress and logs, the corpus builder, the malloc setting."""
