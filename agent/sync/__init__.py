"""`cairn sync DIR`: two-way sync of a local folder with the appliance."""
