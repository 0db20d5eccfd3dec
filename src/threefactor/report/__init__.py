"""What a run shows: plots and TensorBoard, attached to the trainer as observers."""
