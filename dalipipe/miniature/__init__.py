"""The miniature run's own parts: the synthetic audiovisual world, its media, the bootstrap
captioner trained on it, tiny checkpoints of the real model classes (tests, the rehearsal), the
world's tokenizer and its scores. A paper run uses none of them."""
