"""Command-line tools around training: the memory planner, parameter tables, profiling, resource
accounting and the encoder-cache builder."""
