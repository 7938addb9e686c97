"""What we write: the run folder's file names, atomic and hashed writes, sound weights, the resumable folder job,
the one-writer folder lock, plots, the model card and the Hub push."""
