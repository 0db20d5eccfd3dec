"""Running a training job: the trainer, its run directory and checkpoints, evaluation, and several processes under torchrun."""
