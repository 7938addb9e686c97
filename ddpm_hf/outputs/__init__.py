"""Files and folders, knowing nothing of models: the run folder's file names, atomic and hashed writes, the one-writer
folder lock, the resumable folder job, and pictures written as files."""
