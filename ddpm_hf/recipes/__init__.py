"""What a training run is: the one TrainingConfig with its presets, and a config resolved from presets, flags, a starting point and a saved run."""
