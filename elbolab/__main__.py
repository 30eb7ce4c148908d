from elbolab.cli import entry_point

entry_point()
