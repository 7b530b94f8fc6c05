"""The model folder and its files: what one holds (`meta`), loading it (`load`), making one from the original
checkpoints (`convert`, `keymap`, `checkpoints`) or at random (`tiny`), and the files other engines read
(`serving`)."""
