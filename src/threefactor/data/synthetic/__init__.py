"""Event recordings made in software: the pixel model and the scenes put in front of it."""
