"""Images in: Hub datasets, image folders, parquet/arrow files and the built-in digits, decoded to uint8 tensors."""
