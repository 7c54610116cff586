"""The jobs a user runs, one call each: tame, debias, train, demo."""
