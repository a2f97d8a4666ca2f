"""Training data: box normalization, the synthetic layout set, the layout JSONL loader, transforms, collate,
and the grounding-output parser the annotator uses."""
