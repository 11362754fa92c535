"""The training step: export a round's pairs, train with TRL in a child process, register
the checkpoint. `train_round` is what `prefloop train` and the round flow call."""
