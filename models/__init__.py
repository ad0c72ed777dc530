"""Models beyond the course's two: the T5-style encoder-decoder, KV-cache generation, the novel-word decoder,
weight averaging, starting from a pretrained checkpoint, the generative classifier of one decoder per class, chat."""
